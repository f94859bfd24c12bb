"""What an RL run leaves to read: the per-step curve (metrics/rl_curve.csv), the held-out accuracy
of the starting and the tuned policy with bootstrap intervals and their paired difference
(metrics/rl.md, rl.json), a page of sampled completions with their rewards (rl_samples.md), and
the task's metrics eval scores every model form on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from lmtune.rl.rewards import score

CURVE_COLUMNS = (  # trl's names, where it has them
    "step", "loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
    "completions/clipped_ratio", "entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
    "clip_ratio/region_mean", "generation_tokens_per_second", "lr",
)  # fmt: skip


def curve_frame(curve: list[dict]) -> pd.DataFrame:
    """The per-step records as a table: the columns above, then each reward function's mean and spread."""
    frame = pd.DataFrame(curve)
    rewards = sorted(c for c in frame.columns if c.startswith("rewards/"))
    return frame[[c for c in (*CURVE_COLUMNS, *rewards) if c in frame.columns]]


def curve_plot(curve: pd.DataFrame, path: Path, title: str) -> None:
    """The run at a glance (metrics/rl_curve.png): each rollout batch's mean reward with its
    5-step running mean, and the completions' mean length on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        curve["step"], curve["reward"], color="tab:blue", alpha=0.35, marker=".", label="reward per batch"
    )
    ax.plot(
        curve["step"], curve["reward"].rolling(5, min_periods=1).mean(), color="tab:blue", label="5-step mean"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the rollout batch")
    length = ax.twinx()
    length.plot(
        curve["step"], curve["completions/mean_length"], color="tab:gray", linestyle="--", label="length"
    )
    length.set_ylabel("completion length, tokens", color="tab:gray")
    lines = ax.get_lines() + length.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left", frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def held_out_scores(before: np.ndarray, after: np.ndarray, resamples: int, seed: int) -> dict[str, dict]:
    """Held-out accuracy of the starting and the tuned policy, and the tuned one's gain, question by
    question, each with a 95% bootstrap interval (the eval stage's bootstrap, the same draws)."""
    from lmtune.evaluate.scores import bootstrap

    means = {
        "start": lambda idx: float(before[idx].mean()),
        "tuned": lambda idx: float(after[idx].mean()),
        "gain": lambda idx: float((after[idx] - before[idx]).mean()),
    }
    scored = bootstrap(
        {"held_out": means}, dict.fromkeys(means, len(before)), "held_out", resamples, seed, min_examples=1
    )
    return scored["held_out"]


def held_out_markdown(before: np.ndarray, after: np.ndarray, cfg: DictConfig) -> dict:
    """{held_out: {accuracy: {start, tuned, gain}}, page}: the numbers and the page that shows them."""
    scores = held_out_scores(before, after, 1000, cfg.seed)
    cell = lambda s, sign="": f"{s['value']:{sign}.3f} [{s['ci95'][0]:{sign}.3f}, {s['ci95'][1]:{sign}.3f}]"  # noqa: E731
    rl = cfg.rl
    page = "\n".join(
        [
            f"# RL: {rl.method} ({rl.loss_type}, {rl.importance_sampling_level}-level ratio) on {rl.task}",
            "",
            f"{len(before)} held-out questions, greedy answers scored by the task; 95% bootstrap intervals in",
            "brackets; the gain is paired, question by question.",
            "",
            "| policy | held-out accuracy |",
            "|---|---|",
            f"| starting ({rl.start}) | {cell(scores['start'])} |",
            f"| after {rl.max_steps} steps | {cell(scores['tuned'])} |",
            f"| gain | {cell(scores['gain'], '+')} |",
            "",
        ]
    )
    return {"held_out": {"accuracy": scores}, "page": page}


def samples_markdown(folder: Path, rl: DictConfig, per_batch: int = 4) -> str:
    """The first and the last rollout batch, a few completions of each with their rewards: what
    the policy said before and after."""
    files = sorted(Path(folder).glob("rollout_*.parquet"))
    lines = [f"# RL samples: {rl.task}", ""]
    for path in [files[0], files[-1]] if len(files) > 1 else files:
        frame = pd.read_parquet(path)
        reward_columns = [c for c in frame.columns if c.startswith("reward/")]
        lines += [
            f"## Rollout batch {int(frame['rollout'].iloc[0])} (mean reward {frame['reward'].mean():.3f})",
            "",
        ]
        for _, row in frame.head(per_batch).iterrows():
            scores = ", ".join(f"{c.removeprefix('reward/')} {row[c]:.2f}" for c in reward_columns)
            completion = row["completion"].replace("\n", " ").strip() or "(empty)"
            lines += [
                f"- **reward {row['reward']:.2f}** ({scores}; advantage {row['advantage']:+.2f}): {completion}"
            ]
        lines.append("")
    return "\n".join(lines)


def rollout_table(folder: Path) -> pd.DataFrame:
    """Every stored completion with its rewards: what MLflow shows as the run's table of samples."""
    frames = [pd.read_parquet(p) for p in sorted(Path(folder).glob("rollout_*.parquet"))]
    frame = pd.concat(frames, ignore_index=True)
    keep = ["rollout", "prompt_row", "generation", "completion", "truncated", "reward", "advantage"]
    return frame[keep + [c for c in frame.columns if c.startswith("reward/")]]


def task_functions(
    rows: list[dict],
    answers: list[str],
    answer_tokens: list[int],
    samples: list[str],
    k: int,
    scorer,
    rewards,
) -> dict:
    """A model's metrics on the task's held-out questions, as f(question indices) for the bootstrap:
    the task's score of its greedy `answers` (accuracy), their reward under rl.rewards (`rewards`:
    lmtune.rl.rewards.reward_functions) and length; with `samples` (k per question, question-major,
    for the first len(samples) // k questions) the best of each question's k scores: pass@k."""
    right = np.array([scorer(r["question"], a, r) for r, a in zip(rows, answers, strict=True)])
    reward = np.array(score(rewards, [r["question"] for r in rows], answers, rows)["reward"])
    lengths = np.array(answer_tokens, dtype=float)
    functions = {
        "task_accuracy": lambda idx: float(right[idx].mean()),
        "task_reward": lambda idx: float(reward[idx].mean()),
        "task_answer_tokens": lambda idx: float(lengths[idx].mean()),
    }
    if samples:
        per_sample = [r for r in rows[: len(samples) // k] for _ in range(k)]
        scored = [scorer(r["question"], a, r) for r, a in zip(per_sample, samples, strict=True)]
        best = np.array(scored).reshape(-1, k).max(1)
        functions["task_pass_at_k"] = lambda idx: float(best[idx].mean())
    return functions
