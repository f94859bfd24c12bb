"""The one training engine under every method that tunes a LoRA adapter: supervised fine-tuning
(lmtune.train.loop), preference tuning (lmtune.align.loop), and the next one.

A method supplies what is its own: the loss of one micro-batch (a pure function of the step and
the micro-batch index, so that a resumed run sees the same data), what to check between steps
(SFT's validation loss) and its names. The engine does what every method would otherwise write
again: the optimizer and its schedule, mixed precision, gradient accumulation over micro-batches
and processes (accelerate), the guards (a LoRA matrix without gradient, a non-finite loss, an
adapter that never moved), checkpoints and exact resume, progress with rate and ETA, per-step
records and the steady rate. The shape follows torchtune's recipes and trl's trainers: one loop,
methods as losses.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from lmtune.model.hardware import device, resolve_dtype
from lmtune.model.lora import lora_state
from lmtune.train import TrainingError, distributed
from lmtune.train.resume import latest_checkpoint, load_checkpoint, save_checkpoint

WARMUP_STEPS = 5  # steps left out of the steady rate: first kernels, allocator growth, caches

# (the model as trained: the PeftModel, or its DDP/FSDP wrapper under accelerate; the global
# micro-batch index; the autocast context) → (the micro-batch's mean loss, statistics to average
# over the step (tensors; an empty one counts as absent), useful tokens). The index runs over the
# seeded order of micro-batches (lmtune.train.distributed.micro_batch_index), so a pure function
# of it gives a resumed run the same data.
MicroBatch = Callable[[object, int, object], tuple[torch.Tensor, dict[str, torch.Tensor], int]]


@dataclass(frozen=True)
class Schedule:
    """How long and how fast a method trains: the keys of its config section (train:, align:)."""

    max_steps: int
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_grad_norm: float
    checkpoint_every: int
    keep_checkpoints: int

    @classmethod
    def of(cls, section: DictConfig, **fixed) -> Schedule:
        """The schedule from a config section; `fixed` for keys the section does not have."""
        names = cls.__dataclass_fields__
        return cls(**{name: fixed[name] if name in fixed else section[name] for name in names})


@dataclass
class Method:
    """What one training method brings to the engine."""

    name: str  # the progress bar's label: "finetune", "align"
    micro_batch: MicroBatch
    fingerprint: str  # what a checkpoint must match to be resumed (config and data)
    hint: str  # what to try when the loss is not finite
    loss_name: str = "loss"  # how its errors call the loss
    between_steps: Callable[[int], dict[str, float]] | None = None  # after step N: more to record
    log_as: dict[str, str] = field(default_factory=dict)  # record key → the name it is logged under
    shown: dict[str, str] = field(default_factory=dict)  # progress label → record key, beside loss
    # whether step N's loss has a gradient at all (RL: not when every group's rewards are equal);
    # the guards against LoRA matrices without gradient hold only for steps that do
    gradient_expected: Callable[[int], bool] | None = None


def peak_memory_gib() -> float:
    """Peak allocated GPU memory, or peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def precision(cfg: DictConfig):
    """The autocast context and the gradient scaler for the base's compute dtype.

    LoRA weights stay fp32 for the optimizer while the base computes in 16 bits. Under autocast
    the adapter matmuls run in 16 bits too, and peft skips casting every layer's whole input to
    fp32 and back (faster per step; bench/RESULTS.md). fp16 (cards without bf16: T4, V100)
    overflows and underflows where bf16 does not: its gradients go through a loss scaler."""
    compute = resolve_dtype(cfg.quant.bnb_4bit_compute_dtype)
    half = compute in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(device().type, dtype=compute) if half else nullcontext()
    return autocast, torch.amp.GradScaler(device().type, enabled=compute == torch.float16)


def fit(
    model,
    method: Method,
    schedule: Schedule,
    cfg: DictConfig,
    checkpoint_dir: Path,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train the LoRA parameters of `model` (a PeftModel) by `method`; returns the steps, the
    per-step records (`curve`), tokens, times and rates. Under `accelerate launch` every process
    runs this with its share of each step's micro-batches."""
    accelerator = distributed.accelerator()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(params, schedule, accelerator.num_processes)
    autocast, scaler = precision(cfg)
    initial = lora_state(model)  # LoRA init is seeded, so this holds after a resume too
    state, resumed_from = _start_or_resume(
        checkpoint_dir, method.fingerprint, model, optimizer, scheduler, scaler, schedule.max_steps
    )
    plain = model  # the PeftModel, for its weights; `model` becomes the DDP/FSDP wrapper if launched
    # the scheduler is stepped here, once per optimizer step, not prepared
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    learned = method.gradient_expected is None  # whether a step had a gradient to learn from
    bar = tqdm(
        total=schedule.max_steps,
        initial=state["step"],
        desc=method.name,
        unit="step",
        dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    )
    while state["step"] < schedule.max_steps:
        started = time.perf_counter()
        sums, tokens = _accumulate(model, method, schedule, state["step"], autocast, scaler)
        _check_step(sums["loss"], method, state["step"] + 1, checkpoint_dir)
        scaler.unscale_(optimizer)  # true gradients for the checks and clipping (a no-op without fp16)
        if method.gradient_expected is None or method.gradient_expected(state["step"]):
            _check_gradients(plain, state["step"] + 1)
            learned = True
        optimizer_step(optimizer, scheduler, scaler, params, schedule.max_grad_norm)
        step = _record_step(state, tokens, time.perf_counter() - started)
        record = {**sums, "lr": scheduler.get_last_lr()[0]}
        if method.between_steps:
            record |= method.between_steps(step)
        state["curve"].append({"step": step, **record})
        if on_step and accelerator.is_main_process:
            on_step(step, {method.log_as.get(k, k): v for k, v in record.items()})
        shown = {label: f"{record[key]:.2f}" for label, key in method.shown.items() if key in record}
        bar.set_postfix(
            loss=f"{record['loss']:.3f}", **shown, tok_s=f"{state['tokens'] / state['seconds']:.0f}"
        )
        bar.update(1)
        if step % schedule.checkpoint_every == 0 and step < schedule.max_steps:
            if accelerator.is_main_process:  # every process holds the same weights and optimizer state
                save_checkpoint(
                    checkpoint_dir, plain, optimizer, scheduler, scaler, state, schedule.keep_checkpoints
                )
            accelerator.wait_for_everyone()
    bar.close()
    final = lora_state(plain)
    if learned:
        unchanged_matrices(final, initial)
    return {
        "steps": state["step"],
        "resumed_from_step": resumed_from,
        "train_tokens": state["tokens"],
        "train_seconds": state["seconds"],
        "tokens_per_second": state["tokens"] / max(state["seconds"], 1e-9),
        **steady_rate(state["step_times"], WARMUP_STEPS),
        "lora_matrices": len(final),
        "curve": state["curve"],
        "step_times": state["step_times"],
    }


def _accumulate(model, method: Method, schedule: Schedule, step: int, autocast, scaler):
    """One optimizer step's gradients over grad_accum micro-batches on every process; returns the
    step's mean loss and statistics and its useful tokens, the same on every process (one host
    sync for all of them)."""
    accelerator = distributed.accelerator()
    processes, rank = accelerator.num_processes, accelerator.process_index
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for micro in range(schedule.grad_accum):
        index = distributed.micro_batch_index(step, micro, schedule.grad_accum, rank, processes)
        loss, stats, useful = method.micro_batch(model, index, autocast)
        scaler.scale(loss / schedule.grad_accum).backward()
        for name, value in {"loss": loss.detach(), **stats}.items():
            if value.numel():  # a micro-batch may hold no example of a kind (KTO's labels)
                sums[name] = sums.get(name, 0) + value.detach().float().mean().double() / schedule.grad_accum
        tokens += useful  # padding never counts
    names = list(sums)
    totals = accelerator.reduce(
        torch.stack([*(sums[n].to(device()) for n in names), torch.tensor(float(tokens), device=device())]),
        reduction="sum",
    ).tolist()
    means = {name: total / processes for name, total in zip(names, totals, strict=False)}
    return means, int(totals[-1])


def _check_step(loss: float, method: Method, step: int, checkpoint_dir: Path) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"{method.loss_name} is {loss} at step {step}; training stopped. The last good checkpoint "
            f"stays in {checkpoint_dir}. {method.hint}"
        )


def _check_gradients(model, step: int) -> None:
    """Every adapter must get a gradient: a zero one means a layer silently stopped learning
    (the bitsandbytes CPU repack bug does this to early layers of real models). lora_B is
    checked because its gradient is nonzero from the first step (lora_A's is zero while B is).
    One host sync for all matrices: a `.any()` per matrix would stall a GPU a few hundred times."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    if not named:
        return
    alive = torch.stack(
        [
            p.grad.ne(0).any() if p.grad is not None else torch.zeros((), dtype=torch.bool, device=p.device)
            for _, p in named
        ]
    ).tolist()
    dead = [n for (n, _), ok in zip(named, alive, strict=True) if not ok]
    if dead:
        raise TrainingError(
            f"step {step}: {len(dead)} LoRA matrices got no gradient (e.g. {dead[:2]}); they would "
            "silently stop learning. With bitsandbytes 4-bit on CPU, check lmtune.model.load.keep_4bit_trainable."
        )


def _optimizer(params: list, schedule: Schedule, processes: int):
    """AdamW over the LoRA parameters and its cosine schedule with warmup."""
    from transformers import get_cosine_schedule_with_warmup

    # fused AdamW: one kernel for all LoRA tensors on a card (not under DDP/FSDP's wrappers)
    fused = device().type == "cuda" and processes == 1
    optimizer = torch.optim.AdamW(
        params, lr=schedule.lr, weight_decay=schedule.weight_decay, fused=fused or None
    )
    return optimizer, get_cosine_schedule_with_warmup(optimizer, schedule.warmup_steps, schedule.max_steps)


def optimizer_step(optimizer, scheduler, scaler, params: list, max_grad_norm: float) -> None:
    """Clip the unscaled gradients, step the optimizer and the schedule, clear the gradients."""
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale lowered
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _start_or_resume(checkpoint_dir: Path, fp: str, model, optimizer, scheduler, scaler, max_steps: int):
    """A fresh training state, or the one of the latest checkpoint made with this fingerprint
    (same config and data), its weights and optimizer state loaded; and the step it resumed from."""
    state = {"step": 0, "fingerprint": fp, "curve": [], "tokens": 0, "seconds": 0.0, "step_times": []}
    if checkpoint := latest_checkpoint(checkpoint_dir, fp):
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler)
        print(f"resuming from {checkpoint} (step {state['step']} of {max_steps})")
        return state, state["step"]
    return state, None


def _record_step(state: dict, tokens: int, seconds: float) -> int:
    """Count a finished step in the training state (what a checkpoint saves); returns its number."""
    state["step"] = step = state["step"] + 1
    state["tokens"] += tokens
    state["seconds"] += seconds
    state["step_times"].append({"step": step, "seconds": seconds, "tokens": tokens})
    return step


def steady_rate(step_times: list[dict], warmup: int) -> dict:
    """Useful tokens/s of the first `warmup` steps (kernel selection, allocator growth, caches)
    and of the rest, the rate a long run sees."""

    def rate(steps):
        return (
            sum(s["tokens"] for s in steps) / max(sum(s["seconds"] for s in steps), 1e-9) if steps else None
        )

    return {
        "warmup_steps": min(warmup, len(step_times)),
        "warmup_tokens_per_second": rate(step_times[:warmup]),
        "steady_tokens_per_second": rate(step_times[warmup:]),
    }


def unchanged_matrices(final: dict, initial: dict) -> list[str]:
    """Guard against silently frozen layers (the bitsandbytes CPU repack bug, a bad target list):
    every LoRA matrix must have moved from its initial value."""
    unchanged = [n for n, v in final.items() if torch.equal(v, initial[n])]
    if unchanged:
        raise TrainingError(f"{len(unchanged)} LoRA matrices never changed, e.g. {unchanged[:3]}")
    return unchanged
