"""Rollouts are data: every rollout batch (the prompts of one step, num_generations completions
each, sampled from the current policy) is written as a Parquet file with everything training reads
from it, so that a run can be replayed without generating, audited, and browsed.

A rollout batch is a pure function of (seed, its number, the policy at that moment): the prompts are
drawn by lmtune.data.batching.batch_indices, and sampling runs under its own seed in a forked RNG,
so training's own random state (LoRA dropout) never depends on whether a batch was generated or
read back. Sampling runs the policy itself (the quantized base with the LoRA being trained) with a
KV cache, in batches: no second copy of the model.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lmtune.data.batching import batch_indices
from lmtune.data.sequences import Sequence
from lmtune.evaluate.generation import sampled_completions
from lmtune.rl import RLError
from lmtune.rl.losses import advantages
from lmtune.rl.rewards import score
from lmtune.train.logps import token_logps

COLUMNS = (  # one row per completion
    "rollout", "prompt_row", "generation", "seed", "prompt_ids", "completion_ids", "completion",
    "truncated", "learned", "reward", "advantage", "old_logps", "ref_logps",
)  # fmt: skip


def rollout_seed(seed: int, rollout: int) -> int:
    return seed * 100_003 + rollout


def file_of(folder: Path, rollout: int) -> Path:
    return Path(folder) / f"rollout_{rollout:05d}.parquet"


def sequences(prompts: list[list[int]], completions: list[list[int]], learned: list[bool]) -> list[Sequence]:
    """Prompt and completion as one sequence, the completion learned (none of it where `learned`
    is False: a truncated completion with mask_truncated_completions)."""
    return [
        Sequence(p + c, [0] * len(p) + [int(keep)] * len(c))
        for p, c, keep in zip(prompts, completions, learned, strict=True)
    ]


@torch.no_grad()
def behaviour_logps(
    model, seqs: list[Sequence], pad_id: int, packed: bool, rl, autocast
) -> list[list[float]]:
    """Each completion's per-token log-probabilities under the model as it sampled (no dropout)."""
    was_training = model.training
    model.eval()
    with autocast:
        logps, owner, _ = token_logps(model, seqs, pad_id, packed, rl.temperature)
    model.train(was_training)
    counts = torch.bincount(owner, minlength=len(seqs)).tolist()
    return [part.float().tolist() for part in torch.split(logps.float().cpu(), counts)]


class Rollouts:
    """The rollout batches of one run: read from `folder` when there, else generated (and written
    there atomically) when `generate` is on; replay reads only."""

    def __init__(self, folder: Path, generate: bool, make=None):
        self.folder, self.generate, self.make = Path(folder), generate, make
        self.cache: dict[int, pd.DataFrame] = {}

    def get(self, rollout: int) -> pd.DataFrame:
        if rollout in self.cache:
            return self.cache[rollout]
        path = file_of(self.folder, rollout)
        if path.is_file():
            frame = pd.read_parquet(path)
        elif not self.generate:
            raise RLError(
                f"{path} is missing: replay trains on stored rollouts only; dvc pull the run's "
                "data/rollouts, or train without replay"
            )
        else:
            frame = self.make(rollout)
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            frame.to_parquet(partial, index=False)
            partial.replace(path)
        self.cache = {rollout: frame}  # one batch at a time in memory
        return frame


def make_rollout(
    model, rollout: int, rows: list[dict], prompt_ids: list[list[int]], functions, rl, cfg, tokenizer,
    packed: bool, autocast, reference=None,
) -> pd.DataFrame:  # fmt: skip
    """One rollout batch: its prompts (seeded), the completions sampled from `model`, their rewards
    by function and in sum, group-relative advantages, the sampling policy's log-probabilities
    (with rl.num_iterations > 1, where the ratio to it is clipped) and, with beta > 0, the starting
    policy's (`reference`: a context in which `model` is it)."""
    picked = batch_indices(len(rows), rl.batch_size, cfg.seed, rollout)
    prompts = [prompt_ids[i] for i in picked]
    seed = rollout_seed(cfg.seed, rollout)
    began = time.perf_counter()
    was_training = model.training
    model.eval()
    with autocast:  # the policy in the precision training computes its log-probabilities in
        completions = sampled_completions(model, prompts, rl.num_generations, rl, tokenizer, seed)
    model.train(was_training)
    seconds = time.perf_counter() - began
    expanded = [p for p in prompts for _ in range(rl.num_generations)]
    per_row = [rows[i] for i in picked for _ in range(rl.num_generations)]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    questions = [r["question"] for r in per_row]
    scores = score(functions, questions, texts, per_row)
    truncated = [len(c) == rl.max_completion_length and c[-1] != tokenizer.eos_token_id for c in completions]
    learned = [not (t and rl.mask_truncated_completions) for t in truncated]
    seqs = sequences(expanded, completions, learned)
    old = None  # with one update per rollout batch the sampling policy is the trained one: no pass
    if rl.num_iterations > 1:
        old = behaviour_logps(model, seqs, tokenizer.pad_token_id, packed, rl, autocast)
    ref = None
    if rl.beta != 0.0:
        with reference() if reference else contextlib.nullcontext():
            ref = behaviour_logps(model, seqs, tokenizer.pad_token_id, packed, rl, autocast)
    adv = advantages(
        torch.tensor(scores["reward"], dtype=torch.float64), rl.num_generations, rl.scale_rewards
    )
    frame = pd.DataFrame(
        {
            "rollout": rollout,
            "prompt_row": [r["index"] for r in per_row],
            "generation": [g for _ in picked for g in range(rl.num_generations)],
            "seed": seed,
            "prompt_ids": expanded,
            "completion_ids": completions,
            "completion": texts,
            "truncated": truncated,
            "learned": learned,
            **{f"reward/{name}": values for name, values in scores.items() if name != "reward"},
            "reward": scores["reward"],
            "advantage": adv.tolist(),
            "old_logps": old if old is not None else [None] * len(seqs),
            "ref_logps": ref if ref is not None else [None] * len(seqs),
            "generation_seconds": seconds,
        }
    )
    return frame


def summary(frame: pd.DataFrame) -> dict[str, float]:
    """What a rollout batch says about the policy, under trl's names: the reward's mean and spread
    (and each function's), the share of groups whose rewards were all equal (no signal), completion
    length, the share cut at the length limit, generation speed."""
    spread = lambda values: float(values.std(ddof=1)) if len(values) > 1 else 0.0  # noqa: E731
    out = {"reward": float(frame["reward"].mean()), "reward_std": spread(frame["reward"])}
    for column in (c for c in frame.columns if c.startswith("reward/")):
        name = column.removeprefix("reward/")
        out[f"rewards/{name}/mean"] = float(frame[column].mean())
        out[f"rewards/{name}/std"] = spread(frame[column])
    groups = frame["reward"].to_numpy(dtype=float).reshape(-1, int(frame["generation"].max()) + 1)
    lengths = frame["completion_ids"].map(len).to_numpy()
    return out | {
        "frac_reward_zero_std": float((groups.std(1) == 0).mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/clipped_ratio": float(frame["truncated"].mean()),
        "generation_tokens_per_second": float(lengths.sum() / max(frame["generation_seconds"].iloc[0], 1e-9)),
    }


def padded(values: list[list[float]] | None, lengths: list[int]) -> torch.Tensor | None:
    """Per-token values of completions as [completions, longest], zero past each one's end."""
    if values is None or values[0] is None:
        return None
    out = torch.zeros(len(values), max(max(lengths), 1), dtype=torch.float32)
    for i, row in enumerate(values):
        out[i, : len(row)] = torch.as_tensor(np.asarray(row, dtype=np.float32))
    return out
