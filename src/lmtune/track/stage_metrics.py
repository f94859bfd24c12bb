"""What the stages leave in metrics/ (their numbers and report files), and those numbers under the
names MLflow shows them by (`train.final_val_loss`, `eval.merged.perplexity`, ...)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmtune.config import flatten

# what each stage leaves in metrics/: the prefix of its numbers in MLflow → its file
METRICS_FILES = {
    "prepare": "prepare.json",
    "train": "train.json",
    "reference": "reference.json",  # align != none only
    "align": "align.json",
    "rl": "rl.json",  # rl != none only
    "merge": "merge.json",
    "quantize": "quantize.json",
    "eval": "eval.json",
    "sample": "sample.json",
}
REPORT_FILES = (
    "train_loss.csv",
    "val_loss.csv",
    "align_loss.csv",
    "align.md",
    "rl_curve.csv",
    "rl.md",
    "rl_samples.md",
    "eval.md",
    "samples.md",
    "samples.jsonl",
)


def numbers(metrics: dict, prefix: str) -> dict[str, float]:
    """The finite numbers of a nested metrics dict, flattened under `prefix`."""
    flat = flatten(metrics, prefix=prefix)
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def pipeline_metrics(metrics_dir: str | Path, files: set[str] | None = None) -> dict[str, float]:
    """The numbers of each stage's metrics file in `metrics_dir` (those named in `files`, if given),
    under MLflow's names (`train.final_val_loss`, `eval.merged.perplexity`, ...)."""
    found: dict[str, float] = {}
    for prefix, name in METRICS_FILES.items():
        path = Path(metrics_dir) / name
        if files is not None and str(path) not in files:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not produced (yet): a --multirun job, a stage that never ran
        if prefix == "eval":  # per model: each metric's value, its speed figures, its benchmarks
            benchmarks = data.get("benchmarks", {})
            data = {
                model: {m: v["value"] for m, v in per.items()}
                | data.get("speed", {}).get(model, {})
                | {
                    task: {metric: entry["value"] for metric, entry in scores.items()}
                    for task, scores in benchmarks.get(model, {}).items()
                }
                for model, per in data.get("models", {}).items()
            }
        found.update(numbers(data, f"{prefix}."))
    return found
