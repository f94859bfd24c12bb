"""Continue prompts (or answer questions) with the base and the fine-tuned model, side by side.

    python stages/sample.py [key=value ...]      # e.g. sample.max_new_tokens=128

Prompts: data.sample_prompts, or else the test split's first sample.num_prompts (a conversation's
question through the chat template, or a passage's opening with its true continuation as the
reference). Writes metrics/samples.jsonl (one row per prompt and model), metrics/samples.md (a
table to read) and metrics/sample.json (tokens/s).
"""

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lmtune.artifacts import write_json, write_text
from lmtune.checkpoint import load_tokenizer
from lmtune.data.sequences import read_prompts, read_sequences
from lmtune.evaluate.generation import generate, samples_markdown, tokens_per_second
from lmtune.model.hardware import resolve_dtype, set_threads
from lmtune.model.load import load_full
from lmtune.pipeline.runner import run_stage

OPENING_TOKENS = 24  # a test passage's opening, when no prompts are configured


def prompts_for(cfg, tokenizer) -> tuple[list[str], list[str], list[str | None], bool]:
    """(model inputs, what the page shows as the prompt, references, rendered by the chat template)."""
    n, processed = cfg.sample.num_prompts, cfg.paths.processed
    if cfg.data.sample_prompts:
        prompts = list(cfg.data.sample_prompts)[:n]
        return prompts, prompts, [None] * len(prompts), False
    if cfg.data.format == "chat":
        questions = read_prompts(processed, "test")[:n]
        return (
            [q["prompt"] for q in questions],
            [q["question"] for q in questions],
            [q["references"][0] for q in questions],
            True,
        )
    seqs = [s for s in read_sequences(processed, "test") if len(s) > OPENING_TOKENS][:n]
    openings = [tokenizer.decode(s[:OPENING_TOKENS], skip_special_tokens=True) for s in seqs]
    truths = [
        tokenizer.decode(s[OPENING_TOKENS:][: cfg.sample.max_new_tokens], skip_special_tokens=True)
        for s in seqs
    ]
    return openings, openings, truths, False


def run(cfg) -> dict:
    set_threads(cfg.train.threads)
    paths, metrics_dir, dtype = cfg.paths, Path(cfg.paths.metrics), resolve_dtype(cfg.sample.dtype)
    tokenizer = load_tokenizer(paths.merged)
    prompts, shown, references, rendered = prompts_for(cfg, tokenizer)
    outputs = {
        name: generate(load_full(path, dtype), tokenizer, prompts, cfg.sample, cfg.seed, rendered)
        for name, path in {"base": paths.base, "merged": paths.merged}.items()
    }
    settings = OmegaConf.to_container(cfg.sample) | {"seed": cfg.seed}
    rows = [
        {"model": name, **row, "shown": s, "reference": ref}
        for name, rows in outputs.items()
        for row, s, ref in zip(rows, shown, references, strict=True)
    ]
    write_text(metrics_dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    page = samples_markdown(
        outputs["base"],
        outputs["merged"],
        settings,
        f"{cfg.model.name} on {cfg.data.name}",
        shown,
        references,
    )
    write_text(metrics_dir / "samples.md", page)
    metrics = {f"{name}_tokens_per_second": tokens_per_second(rows) for name, rows in outputs.items()}
    write_json(metrics_dir / "sample.json", metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(run))
