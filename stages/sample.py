"""Continue the prompts in conf/sample with the base and the fine-tuned model, side by side.

    python stages/sample.py [key=value ...]      # e.g. sample.max_new_tokens=128

Writes metrics/samples.jsonl (one row per prompt and model), metrics/samples.md (a table to
read) and metrics/sample.json (tokens/s); all three reach the pipeline's MLflow run.
"""

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lmtune.artifacts import write_json, write_text
from lmtune.generation import generate, samples_markdown, tokens_per_second
from lmtune.modeling import load_full, load_tokenizer, resolve_dtype, set_threads
from lmtune.runner import run_stage


def run(cfg) -> dict:
    set_threads(cfg.train.threads)
    paths, metrics_dir, dtype = cfg.paths, Path(cfg.paths.metrics), resolve_dtype(cfg.sample.dtype)
    prompts = list(cfg.sample.prompts)
    tokenizer = load_tokenizer(paths.merged)
    outputs = {name: generate(load_full(path, dtype), tokenizer, prompts, cfg.sample, cfg.seed)
               for name, path in {"base": paths.base, "merged": paths.merged}.items()}  # fmt: skip
    settings = {k: v for k, v in OmegaConf.to_container(cfg.sample).items() if k != "prompts"}
    settings["seed"] = cfg.seed
    rows = [{"model": name, **row} for name, rows in outputs.items() for row in rows]
    write_text(metrics_dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    page = samples_markdown(
        outputs["base"], outputs["merged"], settings, f"{cfg.model.name} on {cfg.data.name}"
    )
    write_text(metrics_dir / "samples.md", page)
    metrics = {f"{name}_tokens_per_second": tokens_per_second(rows) for name, rows in outputs.items()}
    write_json(metrics_dir / "sample.json", metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(run))
