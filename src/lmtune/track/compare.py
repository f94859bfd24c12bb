"""`make compare`: every finished pipeline run in the MLflow store, side by side.

Writes reports/sweep.md (one table per model, data and step count, since only runs that share
them score the same test split on the same schedule; best first within each; failed runs listed) and PNG plots in
metrics/plots/: quality vs LoRA rank for each bits value, quality vs peak memory (the trade-off
being chosen), training loss curves overlaid. The plots are logged to MLflow in a run tagged
`lmtune.kind=comparison`.

    python -m lmtune.track.compare [--uri URI] [--experiment NAME]   # default: as params.yaml configures
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from lmtune import LmtuneError
from lmtune.artifacts import write_text
from lmtune.track import runs as tracking
from lmtune.track import store

COLUMNS = {  # column → (source, key); "metric_sum" adds up every metric whose name starts with key
    "experiment": ("tag", "dvc_experiment"),
    "model": ("param", "model.name"),
    "data": ("param", "data.name"),
    "r": ("param", "lora.r"),
    "bits": ("param", "quant.bits"),
    "steps": ("metric", "train.steps"),  # what ran: max_steps, or what train.epochs meant
    "perplexity": ("metric", "eval.merged.perplexity"),
    "base perplexity": ("metric", "eval.base.perplexity"),
    "token acc": ("metric", "eval.merged.token_accuracy"),
    "ROUGE-L": ("metric", "eval.merged.rougeL"),
    "BLEU": ("metric", "eval.merged.bleu"),
    "peak GiB": ("metric", "train.peak_memory_gib"),
    "procs": ("metric", "train.processes"),  # tokens/s is of all processes together
    "tokens/s": ("metric", "train.tokens_per_second"),
    "adapter MB": ("metric", "train.adapter_mb"),
    "train s": ("metric", "train.train_seconds"),
    "wall s": ("metric_sum", "wall_seconds."),  # each stage's, finetune to sample
}


def collect(client, experiment: str) -> tuple[pd.DataFrame, list[dict]]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(
            f"no MLflow experiment '{experiment}' yet: run the pipeline (make run / make sweep) first"
        )
    rows, failed = [], []
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        if run.data.tags.get(tracking.KIND_TAG) == "comparison":
            continue
        if run.info.status != "FINISHED" or "eval.merged.perplexity" not in run.data.metrics:
            failed.append(
                {
                    "run": run.info.run_name,
                    "status": run.info.status,
                    "experiment": run.data.tags.get("dvc_experiment", ""),
                }
            )
            continue
        row = {"run_id": run.info.run_id, "run": run.info.run_name}
        for column, (kind, key) in COLUMNS.items():
            if kind == "metric_sum":
                parts = [v for name, v in run.data.metrics.items() if name.startswith(key)]
                row[column] = sum(parts) if parts else None
                continue
            source = {"tag": run.data.tags, "param": run.data.params, "metric": run.data.metrics}[kind]
            row[column] = source.get(key)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        for column in ("r", "bits", "steps"):
            frame[column] = pd.to_numeric(frame[column])
        frame = frame.sort_values("perplexity").reset_index(drop=True)
    return frame, failed


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value.is_integer() and abs(value) >= 1:  # counts logged as MLflow floats
            return str(int(value))
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.1f}"
    return "-" if value is None else str(value)


GROUP = ["model", "data", "steps"]  # runs comparable with each other: same test split, same schedule


def table(frame: pd.DataFrame, failed: list[dict]) -> str:
    lines = ["# Sweep: every finished run, best merged perplexity first", ""]
    if frame.empty:
        lines.append("No finished runs yet.")
    else:
        shown = [c for c in COLUMNS if c in frame.columns and c not in GROUP]
        for keys, group in frame.groupby(GROUP, dropna=False):
            model, data, steps = map(_fmt, keys)
            lines += [f"## {model} on {data}, {steps} steps", ""]
            lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
            for _, row in group.iterrows():
                lines.append("| " + " | ".join(_fmt(row[c]) for c in shown) + " |")
            lines.append("")
        lines += [
            "perplexity, token acc, ROUGE-L, BLEU: the merged model on the test split "
            "(metrics/eval.md explains each); peak GiB: training peak memory. Runs of different "
            "models, data or step counts are in separate tables: their numbers are not comparable.",
            "",
        ]
    if failed:
        lines += ["## Failed or unfinished runs", ""]
        lines += [f"- {f['run']} ({f['experiment'] or 'no DVC experiment'}): {f['status']}" for f in failed]
    lines += [
        "",
        "Plots: plots/quality_vs_rank.png, quality_vs_memory.png, loss_curves.png (beside this page)",
        "",
    ]
    return "\n".join(lines)


def plots(frame: pd.DataFrame, client, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    # one line per profile and bits: runs of other models or step counts are not comparable points
    for (model, steps, bits), group in frame.groupby(["model", "steps", "bits"]):
        group = group.sort_values("r")
        ax.plot(group["r"], group["perplexity"], marker="o", label=f"{bits}-bit base, {model}, {steps} steps")
    ax.set(xlabel="LoRA rank r", ylabel="test perplexity (merged, lower is better)", title="Quality vs rank")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out / "quality_vs_rank.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(frame["peak GiB"], frame["perplexity"], c=frame["bits"], cmap="viridis", s=60)
    for _, row in frame.iterrows():
        ax.annotate(
            f"r{row['r']}/{row['bits']}b",
            (row["peak GiB"], row["perplexity"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set(xlabel="training peak memory (GiB)", ylabel="test perplexity (merged)", title="Quality vs memory")
    ax.grid(alpha=0.3)
    paths.append(out / "quality_vs_memory.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for _, row in frame.iterrows():
        history = sorted(client.get_metric_history(row["run_id"], "train_loss"), key=lambda m: m.step)
        ax.plot(
            [m.step for m in history],
            [m.value for m in history],
            label=f"r{row['r']}/{row['bits']}b",
            alpha=0.8,
        )
    ax.set(xlabel="step", ylabel="training loss", title="Loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    paths.append(out / "loss_curves.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", help="default: the configured store (tracking.uri, MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", help="default: the configured tracking.experiment")
    # not metrics/: the sweep page committed there is a record, rewritten only when asked (--out metrics)
    parser.add_argument("--out", default="reports", help="folder for sweep.md and plots/ (default: reports)")
    args = parser.parse_args(argv)
    if args.uri is None or args.experiment is None:
        from lmtune.config import load

        try:
            cfg = load()
        except LmtuneError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        args.uri = args.uri or store.tracking_uri(cfg)
        args.experiment = args.experiment or cfg.tracking.experiment
    client = store.client(args.uri)
    frame, failed = collect(client, args.experiment)
    out = Path(args.out)
    write_text(out / "sweep.md", table(frame, failed))
    if not frame.empty:
        pictures = plots(frame, client, out / "plots")
        tracking.log_comparison(args.uri, args.experiment, [*pictures, out / "sweep.md"])
    print((out / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
