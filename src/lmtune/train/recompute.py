"""Activation recompute chosen from measured memory (train.gradient_checkpointing=auto): the least
recompute whose peak fits the budget."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from lmtune.model.hardware import device, free_device_memory
from lmtune.model.load import set_recompute
from lmtune.train.kernels import packed_segments
from lmtune.train.step import collate_micro_batch, micro_batch_loss, to_device


def recompute_name(every_n: int | None, offload: bool) -> str:
    if every_n is None:
        return "none"
    return ("every layer" if every_n == 1 else f"every {every_n} layers") + (" offloaded" if offload else "")


def choose_recompute(
    model,
    probe: list[list[int]],
    tc: DictConfig,
    pad_id: int,
    autocast,
    budget_gib: float | None = None,
    peak_gib: Callable[[], float] | None = None,
) -> dict:
    """train.gradient_checkpointing=auto: the least recompute whose peak fits the budget, measured.

    One forward and backward of `probe` (the micro-batch with the longest passages) per candidate,
    from no recompute to every layer recomputed with its inputs offloaded, stopping at the first
    whose peak, plus AdamW's two fp32 moments per LoRA weight (not allocated yet), fits; one that
    runs out of memory does not fit. Weights and random state are as before: the probe's
    gradients are dropped and its RNG draws undone. `peak_gib` reads the peak since the last
    reset; it defaults to the GPU allocator's."""
    base = model.get_base_model()
    if peak_gib is None:
        if device().type != "cuda":
            set_recompute(base, None)
            return {"recompute": "none", "why": "no GPU allocator to measure on: no recompute"}
        peak_gib = lambda: torch.cuda.max_memory_allocated() / 2**30  # noqa: E731
    if budget_gib is None:
        budget_gib = 0.9 * torch.cuda.get_device_properties(device()).total_memory / 2**30
    layers = base.config.num_hidden_layers
    # every n-th layer for n < layers (larger n recomputes layer 0 only, as n = layers does)
    candidates = [(None, False)] + [(n, False) for n in (8, 4, 2) if n < layers] + [(1, False), (1, True)]
    moments = 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) / 2**30
    batch = to_device(collate_micro_batch(probe, tc, pad_id))
    segments = to_device(packed_segments(batch["position_ids"].cpu()) if "position_ids" in batch else None)
    measured = {}
    # transformers recomputes only in training mode: a probe in eval mode measures no recompute at all
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device()] if device().type == "cuda" else []):
        for every_n, offload in candidates:
            set_recompute(base, every_n, offload)
            name = recompute_name(every_n, offload)
            free_device_memory()
            if device().type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                with autocast:
                    loss = micro_batch_loss(model, batch, tc, segments)
                loss.backward()
                measured[name] = round(peak_gib() + moments, 4)
            except torch.OutOfMemoryError:  # more than the card holds: does not fit any budget
                measured[name] = math.inf
            loss = None
            model.zero_grad(set_to_none=True)
            if measured[name] <= budget_gib:
                break
    model.train(was_training)
    free_device_memory()
    if device().type == "cuda":  # the training peak reported later is training's, not the probe's
        torch.cuda.reset_peak_memory_stats()
    fits = measured[name] <= budget_gib
    print(
        f"recompute (gradient_checkpointing=auto, budget {budget_gib:.1f} GiB): {name}; measured peaks "
        + ", ".join(f"{k} {v} GiB" for k, v in measured.items())
        + ("" if fits else " - none fits: the least memory instead"),
        flush=True,
    )
    return {
        "recompute": name,
        "budget_gib": round(budget_gib, 2),
        "measured_peak_gib": measured,
        "fits": fits,
    }
