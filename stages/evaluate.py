"""Score every model on the test split → metrics/eval.json and metrics/eval.md.

    python stages/evaluate.py [key=value ...]    # or: make eval (reruns only this stage)

Models: the base in 16/32-bit; the quantized base alone and with the adapter exactly as trained
(4/8-bit runs); the merged model. Metrics (README, "Evaluation"): perplexity and token accuracy
on every token of every passage; token F1, ROUGE-1/2/L and BLEU of greedy continuations of each
passage's first eval.prompt_tokens tokens against its next eval.reference_tokens. Each with a 95%
bootstrap interval, and each model's delta vs the base with its paired interval.
"""

import sys
import time
from pathlib import Path

# This script shares its name with the `evaluate` library: keep its folder off the import path
# so that `import evaluate` (in lmtune.metrics) finds the library, not this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from lmtune.artifacts import write_json, write_text
from lmtune.data import read_split, tokenize
from lmtune.generation import greedy_continuations
from lmtune.metrics import (
    ALL_METRICS,
    bootstrap,
    eval_markdown,
    generation_pairs,
    generation_per_example,
    likelihood_per_passage,
    metric_functions,
)
from lmtune.modeling import (
    device,
    load_base_with_adapter,
    load_for_training,
    load_full,
    load_tokenizer,
    resolve_dtype,
)
from lmtune.quantization import load_quantized
from lmtune.runner import run_stage


def model_loaders(cfg, dtype) -> dict:
    paths = cfg.paths
    loaders = {"base": lambda: load_full(paths.base, dtype)}
    if cfg.quant.bits < 16 or cfg.quant.qat:  # the base as training saw it, alone and with the adapter
        label = f"qat_{cfg.quant.qat}" if cfg.quant.qat else f"{cfg.quant.bits}bit"
        loaders[f"base_{label}"] = lambda: load_for_training(paths.base, cfg.quant, False)
        loaders[f"base_{label}_adapter"] = lambda: load_base_with_adapter(
            paths.base, paths.adapter, dtype, quant=cfg.quant
        )
    loaders["merged"] = lambda: load_full(paths.merged, dtype)
    loaders[f"merged_{cfg.quantize.method}"] = lambda: load_quantized(paths.quantized, dtype)
    return loaders


def run(cfg) -> dict:
    e, paths, dtype = cfg.eval, cfg.paths, resolve_dtype(cfg.eval.dtype)
    tokenizer = load_tokenizer(paths.base)
    texts = read_split(paths.processed, "test")[: e.max_passages]
    seqs = tokenize(texts, tokenizer, cfg.data.max_length)
    # generation set: passages long enough to hold a prompt and at least one reference token
    pairs = generation_pairs(seqs, e.prompt_tokens, e.reference_tokens)
    prompts = [p for p, _ in pairs]
    references = [tokenizer.decode(r, skip_special_tokens=True) for _, r in pairs]
    sizes = {m: len(seqs) for m in ALL_METRICS[:2]} | {m: len(pairs) for m in ALL_METRICS[2:]}

    functions, examples, speed = {}, {}, {}
    for name, load in model_loaders(cfg, dtype).items():
        began = time.perf_counter()
        model = load()
        speed[name] = {"load_seconds": time.perf_counter() - began}
        likelihood = likelihood_per_passage(model, seqs, e.batch_size, tokenizer.pad_token_id, desc=name)
        began = time.perf_counter()
        continuations = greedy_continuations(model, prompts, e.reference_tokens, tokenizer.pad_token_id,
                                             tokenizer.eos_token_id, e.batch_size, desc=name)  # fmt: skip
        speed[name]["generated_tokens_per_second"] = sum(map(len, continuations)) / (
            time.perf_counter() - began
        )
        predictions = [tokenizer.decode(c, skip_special_tokens=True) for c in continuations]
        generation = generation_per_example(predictions, references, e.metrics_source)
        functions[name] = metric_functions(likelihood, generation)
        examples[name] = predictions[:3]
        del model
    scores = bootstrap(functions, sizes, "base", e.bootstrap_resamples, cfg.seed)
    settings = {
        "split": "test", "passages": len(seqs), "generation_examples": len(pairs),
        "max_length": cfg.data.max_length, "prompt_tokens": e.prompt_tokens,
        "reference_tokens": e.reference_tokens, "decoding": "greedy",
        "bootstrap_resamples": e.bootstrap_resamples, "dtype": str(dtype).replace("torch.", ""),
        "tokens_scored": int(sum(len(s) - 1 for s in seqs)), "batch_size": e.batch_size,
        "device": str(device()),
    }  # fmt: skip
    metrics = {"models": scores, "speed": speed, "settings": settings}
    write_json(Path(paths.metrics) / "eval.json", metrics)
    write_text(
        Path(paths.metrics) / "eval.md", eval_markdown(scores, settings, references[:3], examples, speed)
    )
    return {name: {m: round(v["value"], 4) for m, v in per.items()} for name, per in scores.items()}


if __name__ == "__main__":
    sys.exit(run_stage(run))
