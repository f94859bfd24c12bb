"""Supervised fine-tuning on the engine (lmtune.train.engine): next-token loss over seeded
micro-batches (packed or padded), validation at intervals, the exact path per family."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lmtune.data.batching import collate
from lmtune.model.hardware import device
from lmtune.train import distributed
from lmtune.train.engine import Method, Schedule, fit, precision
from lmtune.train.exact_path import choose_exact_path, ran_with
from lmtune.train.kernels import packed_segments
from lmtune.train.recompute import choose_recompute, recompute_name
from lmtune.train.resume import fingerprint
from lmtune.train.step import batch_maker, micro_batch_loss, prepare_model, to_device


@torch.no_grad()
def validation_loss(model, seqs: list[list[int]], batch_size: int, batches: int, pad_id: int) -> float:
    """Token-weighted mean loss over the first `batches` validation batches (fixed, not sampled)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(seqs), batches * batch_size), batch_size):
        batch = {k: v.to(device()) for k, v in collate(seqs[start : start + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def steps_for_epochs(cfg: DictConfig, passages: int, processes: int) -> tuple[DictConfig, dict[str, str]]:
    """train.epochs → the optimizer steps it means on this train split and process count (each
    step takes batch_size x grad_accum passages per process); cfg as it is under max_steps."""
    tc = cfg.train
    if tc.epochs is None:
        return cfg, {}
    per_step = tc.batch_size * tc.grad_accum * processes
    steps = max(1, math.ceil(tc.epochs * passages / per_step))
    why = f"train.epochs={tc.epochs:g} over {passages} training passages, {per_step} a step: {steps} steps"
    return OmegaConf.merge(cfg, {"train": {"max_steps": steps}}), {"train.max_steps": why}


def train(
    model,
    train_seqs: list[list[int]],
    val_seqs: list[list[int]],
    cfg: DictConfig,
    checkpoint_dir: Path,
    pad_id: int,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train the LoRA parameters of `model` on next-token loss (the engine's loop, SFT's batches
    and validation); return metrics and the loss curves."""
    asked = cfg
    processes = distributed.accelerator().num_processes
    cfg, notes = _settle_config(model, cfg, len(train_seqs), processes)
    tc = cfg.train
    next_batch = batch_maker(train_seqs, cfg, pad_id)
    prepare_model(model, tc)
    autocast, _ = precision(cfg)
    recompute = _recompute(model, train_seqs, tc, pad_id, autocast, processes)
    if processes > 1:
        print(
            f"process {distributed.accelerator().process_index + 1} of {processes}: global batch "
            f"{tc.batch_size} x {tc.grad_accum} x {processes} passages",
            flush=True,
        )
    plain = model  # validation runs on the PeftModel itself, not on a DDP/FSDP wrapper

    def micro_batch(model, index: int, autocast) -> tuple[torch.Tensor, dict, int]:
        batch, useful = next_batch(index)
        # passage boundaries from the host copy: the kernel needs the longest as a Python int
        segments = packed_segments(batch["position_ids"]) if "position_ids" in batch else None
        batch, segments = to_device(batch), to_device(segments)
        with autocast:
            return micro_batch_loss(model, batch, tc, segments), {}, useful

    def validate(step: int) -> dict[str, float]:
        if step % tc.eval_every and step != tc.max_steps:
            return {}
        return {"val_loss": validation_loss(plain, val_seqs, tc.batch_size, tc.eval_batches, pad_id)}

    method = Method(
        name="finetune",
        micro_batch=micro_batch,
        fingerprint=fingerprint(cfg, train_seqs),
        hint="Try a lower train.lr or quant.bnb_4bit_compute_dtype=fp32.",
        between_steps=validate,
        log_as={"loss": "train_loss"},
    )
    result = fit(model, method, Schedule.of(tc), cfg, checkpoint_dir, on_step)
    curve = result.pop("curve")
    train_curve = [{"step": r["step"], "loss": r["loss"]} for r in curve]
    val_curve = [{"step": r["step"], "loss": r["val_loss"]} for r in curve if "val_loss" in r]
    return {
        "steps": result["steps"],
        "resumed_from_step": result["resumed_from_step"],
        "final_train_loss": train_curve[-1]["loss"],
        "final_val_loss": val_curve[-1]["loss"],
        # tokens and seconds of the global step (every process's passages, wall time of the step), so
        # tokens/s means the same for 1 and N processes; per process it is tokens/s / processes
        "processes": processes,
        "global_batch_passages": tc.batch_size * tc.grad_accum * processes,
        **{k: result[k] for k in ("train_tokens", "train_seconds", "tokens_per_second")},
        **{k: result[k] for k in ("warmup_steps", "warmup_tokens_per_second", "steady_tokens_per_second")},
        **recompute,
        "lora_matrices": result["lora_matrices"],
        "lora_matrices_unchanged": 0,  # the engine refuses an adapter with one
        "ran_with": ran_with(asked, cfg, notes),
        "train_curve": train_curve,
        "val_curve": val_curve,
        "step_times": result["step_times"],
    }


def _settle_config(
    model, cfg: DictConfig, passages: int, processes: int
) -> tuple[DictConfig, dict[str, str]]:
    """The config training runs with: the exact path for this family (packing and the chunked loss
    off where the fast kernels would compute it wrong) and the step count train.epochs implies.
    Returns it with a note per changed key, each printed once."""
    cfg, attention, notes = choose_exact_path(model, cfg)
    if attention:
        model.get_base_model().set_attn_implementation(attention)
    cfg, steps_why = steps_for_epochs(cfg, passages, processes)
    notes |= steps_why
    for note in notes.values() if distributed.is_main() else []:
        print(f"note: {note}", flush=True)
    return cfg, notes


def _recompute(model, train_seqs, tc: DictConfig, pad_id: int, autocast, processes: int) -> dict:
    """Which layers recompute their activations in the backward pass: as configured, or for
    gradient_checkpointing=auto the least recompute that fits (measured on the longest batch;
    under DDP/FSDP every layer, since the probe measures one process only)."""
    every_n = tc.recompute_every_n_layers if tc.gradient_checkpointing is True else None
    if tc.gradient_checkpointing == "auto":
        every_n = 1
    if tc.gradient_checkpointing == "auto" and processes == 1:
        longest = sorted(train_seqs, key=len, reverse=True)[: tc.batch_size]
        return choose_recompute(model, longest, tc, pad_id, autocast, tc.memory_budget_gib)
    return {"recompute": recompute_name(every_n, tc.offload_activations)}
