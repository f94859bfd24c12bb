"""Preference training of a LoRA adapter on the quantized base: the starting policy loaded, the
reference log-probabilities computed once (the `reference` stage, cached by DVC) and read back,
seeded batches of pairs, exact resume from checkpoints, and the held-out pairs scored before and
after."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from lmtune.align.logps import sequence_logps
from lmtune.align.losses import NEEDS_REFERENCE, preference_loss, slots
from lmtune.config import identity
from lmtune.data.batching import batch_indices
from lmtune.train import policy
from lmtune.train.engine import Method, Schedule, fit

SCORE_PAIRS = 16  # pairs per forward pass when scoring without gradients


def start_policy(cfg: DictConfig, trainable: bool):
    """The quantized base as training sees it, with the SFT adapter (align.start=sft) or a fresh
    LoRA (start=base), and whether its pairs go in packed rows (the family's exact path)."""
    return policy.start_policy(cfg, cfg.paths.adapter if cfg.align.start == "sft" else None, trainable)


@torch.no_grad()
def score_pairs(
    model,
    pairs: list[tuple],
    pad_id: int,
    packed: bool,
    desc: str,
    autocast=None,
    names: tuple[str, str] = ("chosen", "rejected"),
) -> dict[str, np.ndarray]:
    """Summed log-probabilities and lengths of both sequences of every item (a pair's chosen and
    rejected response; `names` = lmtune.align.losses.slots(method)), under `autocast` (the
    training's precision: lmtune.train.engine.precision) when given."""
    was_training = model.training
    model.eval()
    first, second = names
    out = {k: [] for k in (first, second, f"{first}_tokens", f"{second}_tokens")}
    for start in tqdm(range(0, len(pairs), SCORE_PAIRS), desc=desc, unit="batch", dynamic_ncols=True):
        batch = pairs[start : start + SCORE_PAIRS]
        with autocast or nullcontext():
            sums, counts = sequence_logps(model, [s for pair in batch for s in pair], pad_id, packed)
        out[first] += sums[0::2].tolist()
        out[second] += sums[1::2].tolist()
        out[f"{first}_tokens"] += counts[0::2].tolist()
        out[f"{second}_tokens"] += counts[1::2].tolist()
    model.train(was_training)
    return {k: np.asarray(v, dtype=np.float64 if "tokens" not in k else np.int64) for k, v in out.items()}


@torch.no_grad()
def with_own_answers(
    model, splits: dict[str, list[dict]], tokenizer, max_new_tokens: int, autocast=None
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Every pair's rejected response replaced by the starting policy's own greedy answer to its
    prompt (on-policy pairs: tuning learns to prefer the data's answer to what the model says now).
    A pair whose own answer is its chosen one (already learned) or empty is left out. Returns the
    pairs and how many were left out, by reason."""
    from lmtune.evaluate.generation import greedy_continuations

    prompts = sorted({repr(p["prompt"]): p["prompt"] for split in splits.values() for p in split}.items())
    ids = [
        tokenizer(
            tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for _, prompt in prompts
    ]
    with autocast or nullcontext():
        answers = greedy_continuations(
            model,
            ids,
            max_new_tokens,
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            SCORE_PAIRS * 2,
            "own answers",
        )
    own = {
        key: tokenizer.decode(a, skip_special_tokens=True).strip()
        for (key, _), a in zip(prompts, answers, strict=True)
    }
    out, left_out = {}, {"own_answer_is_the_chosen_one": 0, "own_answer_empty": 0}
    for name, split in splits.items():
        out[name] = []
        for pair in split:
            answer = own[repr(pair["prompt"])]
            chosen = " ".join(m["content"] for m in pair["chosen"]).strip()
            if not answer:
                left_out["own_answer_empty"] += 1
            elif answer == chosen:
                left_out["own_answer_is_the_chosen_one"] += 1
            else:
                out[name].append(pair | {"rejected": [{"role": "assistant", "content": answer}]})
    return out, left_out


def train_preferences(
    model,
    pairs: list[tuple],
    reference: dict[str, np.ndarray],
    cfg: DictConfig,
    packed: bool,
    checkpoint_dir: Path,
    pad_id: int,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train the LoRA parameters on `pairs` ((chosen, rejected) Sequences; for kto (completion, kl))
    against the reference log-probabilities, on the engine; returns the curve and the last step's
    statistics."""
    a = cfg.align
    ref = {k: torch.as_tensor(v) for k, v in reference.items()}
    first, second = slots(a.method)

    def micro_batch(model, index: int, autocast) -> tuple[torch.Tensor, dict, int]:
        picked = batch_indices(len(pairs), a.batch_size, cfg.seed, index)
        seqs = [s for i in picked for s in pairs[i]]
        with autocast:
            sums, counts = sequence_logps(model, seqs, pad_id, packed)
        policy = {
            first: sums[0::2].float(),
            second: sums[1::2].float(),
            f"{first}_tokens": counts[0::2],
            f"{second}_tokens": counts[1::2],
        }
        reference_batch = (
            {k: v[picked].to(sums.device) for k, v in ref.items()} if a.method in NEEDS_REFERENCE else None
        )
        loss, stats = preference_loss(
            a.method, policy, reference_batch, a.beta, a.label_smoothing, a.gamma,
            a.desirable_weight, a.undesirable_weight,
        )  # fmt: skip
        return loss, stats, sum(len(s) for s in seqs)

    method = Method(
        name="align",
        micro_batch=micro_batch,
        fingerprint=_fingerprint(cfg, pairs),
        hint="Try a lower align.lr or align.beta.",
        loss_name="preference loss",
        # trl's names (rewards/chosen, logps/rejected, ...); loss and lr named apart from SFT's
        log_as={"loss": "align_loss", "lr": "align_lr"},
        shown={"acc": "rewards/accuracies"},
    )
    schedule = Schedule.of(a, weight_decay=0.0, keep_checkpoints=2)
    result = fit(model, method, schedule, cfg, checkpoint_dir, on_step)
    curve = [{k: v for k, v in r.items()} for r in result["curve"]]
    return {
        "steps": result["steps"],
        "resumed_from_step": result["resumed_from_step"],
        "final": curve[-1],
        **{k: result[k] for k in ("train_tokens", "train_seconds", "tokens_per_second")},
        "curve": curve,
    }


def _fingerprint(cfg: DictConfig, pairs: list[tuple]) -> str:
    """What a checkpoint must match to be resumed: the config that shapes this training and the pairs."""
    digest = hashlib.sha256(identity(cfg, ("seed", "model", "quant", "lora", "align")).encode())
    for pair in pairs:
        for seq in pair:
            digest.update(
                np.asarray(seq, dtype=np.int64).tobytes() + np.asarray(seq.mask, dtype=np.int8).tobytes()
            )
    return digest.hexdigest()[:16]


def held_out_scores(
    policy: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    beta: float,
    resamples: int,
    seed: int,
    labels: np.ndarray | None = None,
) -> dict[str, dict]:
    """On held-out pairs, with 95% bootstrap intervals: preference accuracy (the share of pairs whose
    chosen response is the more likely one, summed and per token), the mean margin of summed
    log-probabilities, and the implicit reward accuracy against the reference (zero margin, so 0 for
    the reference itself), and the change in preference accuracy against the reference, pair by
    pair. On held-out unpaired examples (`labels`, KTO's): the implicit reward
    accuracy alone, the share of examples whose reward has their label's sign."""
    if labels is not None:
        reward = beta * (policy["completion"] - reference["completion"])
        values = {"reward_accuracy": ((reward > 0) == labels).astype(float)}
        return _bootstrap(values, resamples, seed)
    per_token = lambda side, d: d[side] / np.maximum(d[f"{side}_tokens"], 1)  # noqa: E731
    margin = policy["chosen"] - policy["rejected"]
    reward_margin = beta * (
        (policy["chosen"] - reference["chosen"]) - (policy["rejected"] - reference["rejected"])
    )
    start_won = (reference["chosen"] - reference["rejected"] > 0).astype(float)
    values = {
        "preference_accuracy": (margin > 0).astype(float),
        # pair by pair against the reference, so its interval is the difference's, not two noises
        "preference_accuracy_vs_reference": (margin > 0).astype(float) - start_won,
        "preference_accuracy_per_token": (per_token("chosen", policy) > per_token("rejected", policy)).astype(
            float
        ),
        "mean_margin": margin,
        "reward_accuracy": (reward_margin > 0).astype(float),
        "mean_reward_margin": reward_margin,
    }
    return _bootstrap(values, resamples, seed)


def _bootstrap(values: dict[str, np.ndarray], resamples: int, seed: int) -> dict[str, dict]:
    """Each per-item value's mean with its 95% interval, by the eval stage's bootstrap (the same
    draws for all)."""
    from lmtune.evaluate.scores import bootstrap

    n = len(next(iter(values.values())))
    means = {name: (lambda idx, v=v: float(v[idx].mean())) for name, v in values.items()}
    sizes = dict.fromkeys(values, n)  # a small held-out set still gets its (wide) interval
    return bootstrap({"held_out": means}, sizes, "held_out", resamples, seed, min_examples=1)["held_out"]


HELD_OUT_COLUMNS = {
    "preference_accuracy": "chosen more likely",
    "preference_accuracy_vs_reference": "vs the reference, paired",
    "preference_accuracy_per_token": "chosen more likely per token",
    "mean_margin": "mean log-prob margin",
    "reward_accuracy": "implicit reward accuracy",
}


def held_out_markdown(held_out: dict[str, dict], method: str, steps: int, pairs: int) -> str:
    """The held-out scores of each model as a page: value and 95% interval per column."""

    def cell(key: str, s: dict) -> str:
        sign = "+" if key.endswith("_vs_reference") else ""
        return f"{s['value']:{sign}.3f} [{s['ci95'][0]:{sign}.3f}, {s['ci95'][1]:{sign}.3f}]"

    paired = all("preference_accuracy" in scores for scores in held_out.values())
    lines = [
        f"# Preference tuning: {method}, {steps} steps",
        "",
        f"{pairs} held-out {'pairs' if paired else 'examples'}; 95% bootstrap intervals in brackets. The "
        "implicit reward is β times the",
        "log-ratio to the reference (the starting policy), so the reference's own is zero. \"vs the reference,",
        'paired" is the change in the share of pairs won, pair by pair, with its own interval.',
        "",
        "| model | " + " | ".join(HELD_OUT_COLUMNS.values()) + " |",
        "|---|" + "---|" * len(HELD_OUT_COLUMNS),
    ]
    for name, scores in held_out.items():
        cells = (cell(k, scores[k]) if k in scores else "-" for k in HELD_OUT_COLUMNS)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
