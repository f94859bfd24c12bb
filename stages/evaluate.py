"""Score the base and the merged model on the test split → metrics/eval.json.

    python stages/evaluate.py [key=value ...]    # or: make eval

Perplexity and next-token accuracy over every token of every test passage (each scored on its
own, truncated to data.max_length), for each model in the same dtype, and the deltas vs base.
"""

import sys
from pathlib import Path

from lmtune import tracking
from lmtune.artifacts import write_json
from lmtune.config import run_stage
from lmtune.data import read_split, tokenize
from lmtune.metrics import language_model_scores
from lmtune.modeling import load_full, load_tokenizer, resolve_dtype, set_threads


def run(cfg) -> dict:
    set_threads(cfg.train.threads)
    paths, dtype = cfg.paths, resolve_dtype(cfg.eval.dtype)
    tokenizer = load_tokenizer(paths.base)
    texts = read_split(paths.processed, "test")[: cfg.eval.max_passages]
    seqs = tokenize(texts, tokenizer, cfg.data.max_length)
    models = {"base": paths.base, "merged": paths.merged}
    scores = {}
    for name, path in models.items():
        model = load_full(path, dtype)
        scores[name] = language_model_scores(
            model, seqs, cfg.eval.batch_size, tokenizer.pad_token_id, desc=name
        )
        del model
    metrics = {
        **scores,
        "delta_vs_base": {
            name: {k: scores[name][k] - scores["base"][k] for k in ("perplexity", "nll", "token_accuracy")}
            for name in models
            if name != "base"
        },
        "settings": {
            "split": "test",
            "passages": len(seqs),
            "max_length": cfg.data.max_length,
            "dtype": str(dtype).replace("torch.", ""),
        },  # fmt: skip
    }
    write_json(Path(paths.metrics) / "eval.json", metrics)
    with tracking.resume_run(cfg, paths.adapter):
        tracking.log_metrics(metrics, prefix="eval.")
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(run))
