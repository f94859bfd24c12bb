"""The LoRA training loop: seeded data order, validation at intervals, exact resume, guards."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from lmtune.data.batching import collate
from lmtune.model.hardware import device, resolve_dtype
from lmtune.model.lora import lora_state
from lmtune.train import TrainingError, distributed
from lmtune.train.checkpoints import fingerprint, latest_checkpoint, load_checkpoint, save_checkpoint
from lmtune.train.exact_path import choose_exact_path, ran_with
from lmtune.train.kernels import packed_segments
from lmtune.train.recompute import choose_recompute, recompute_name
from lmtune.train.step import batch_maker, micro_batch_loss, prepare_model, to_device

WARMUP_STEPS = 5  # steps left out of the steady rate: first kernels, allocator growth, caches


def peak_memory_gib() -> float:
    """Peak allocated GPU memory, or peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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
    """Train the LoRA parameters of `model`; return metrics and the loss curves."""
    asked = cfg
    accelerator = distributed.accelerator()  # one process, or several under DDP/FSDP: one path
    processes, rank = accelerator.num_processes, accelerator.process_index
    cfg, notes = _settle_config(model, cfg, len(train_seqs), processes)
    tc = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(params, tc, processes)
    autocast, scaler = precision(cfg)
    initial = lora_state(model)  # LoRA init is seeded, so this holds after a resume too
    state, resumed_from = _start_or_resume(
        checkpoint_dir, fingerprint(cfg, train_seqs), model, optimizer, scheduler, scaler, tc.max_steps
    )
    next_batch = batch_maker(train_seqs, cfg, pad_id)
    prepare_model(model, tc)
    recompute = _recompute(model, train_seqs, tc, pad_id, autocast, processes)
    plain = model  # the PeftModel, for its weights; `model` becomes the DDP/FSDP wrapper if launched
    # the scheduler is stepped here, once per optimizer step, not prepared
    model, optimizer = accelerator.prepare(model, optimizer)
    if processes > 1:
        print(
            f"process {rank + 1} of {processes}: global batch {tc.batch_size} x {tc.grad_accum} x "
            f"{processes} passages",
            flush=True,
        )

    model.train()
    bar = tqdm(
        total=tc.max_steps,
        initial=state["step"],
        desc="finetune",
        unit="step",
        dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    )
    while state["step"] < tc.max_steps:
        started = time.perf_counter()
        train_loss, tokens = _optimizer_step(
            model,
            plain,
            params,
            optimizer,
            scheduler,
            scaler,
            autocast,
            next_batch,
            tc,
            state["step"],
            checkpoint_dir,
        )
        step = _record_step(state, train_loss, tokens, time.perf_counter() - started)
        record = {"train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}
        if step % tc.eval_every == 0 or step == tc.max_steps:
            val = validation_loss(plain, val_seqs, tc.batch_size, tc.eval_batches, pad_id)
            state["val_curve"].append({"step": step, "loss": val})
            record["val_loss"] = val
        if on_step and accelerator.is_main_process:
            on_step(step, record)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{state['tokens'] / state['seconds']:.0f}")
        bar.update(1)
        if step % tc.checkpoint_every == 0 and step < tc.max_steps:
            if accelerator.is_main_process:  # every process holds the same weights and optimizer state
                save_checkpoint(
                    checkpoint_dir, plain, optimizer, scheduler, scaler, state, tc.keep_checkpoints
                )
            accelerator.wait_for_everyone()
    bar.close()

    final = lora_state(plain)
    unchanged = unchanged_matrices(final, initial)
    return {
        "steps": state["step"],
        "resumed_from_step": resumed_from,
        "final_train_loss": state["train_curve"][-1]["loss"],
        "final_val_loss": state["val_curve"][-1]["loss"],
        # tokens and seconds of the global step (every process's passages, wall time of the step), so
        # tokens/s means the same for 1 and N processes; per process it is tokens/s / processes
        "processes": processes,
        "global_batch_passages": tc.batch_size * tc.grad_accum * processes,
        "train_tokens": state["tokens"],
        "train_seconds": state["seconds"],
        "tokens_per_second": state["tokens"] / max(state["seconds"], 1e-9),
        **steady_rate(state["step_times"], WARMUP_STEPS),
        **recompute,
        "lora_matrices": len(final),
        "lora_matrices_unchanged": len(unchanged),
        "ran_with": ran_with(asked, cfg, notes),
        "train_curve": state["train_curve"],
        "val_curve": state["val_curve"],
        "step_times": state["step_times"],
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


def _optimizer(params: list, tc: DictConfig, processes: int):
    """AdamW over the LoRA parameters and its cosine schedule with warmup."""
    from transformers import get_cosine_schedule_with_warmup

    # fused AdamW: one kernel for all LoRA tensors on a card (not under DDP/FSDP's wrappers)
    fused = device().type == "cuda" and processes == 1
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused or None)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)


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


def _start_or_resume(checkpoint_dir: Path, fp: str, model, optimizer, scheduler, scaler, max_steps: int):
    """A fresh training state, or the one of the latest checkpoint made with this fingerprint
    (same config and data), its weights and optimizer state loaded; and the step it resumed from."""
    state = {
        "step": 0,
        "fingerprint": fp,
        "train_curve": [],
        "val_curve": [],
        "tokens": 0,
        "seconds": 0.0,
        "step_times": [],
    }
    if checkpoint := latest_checkpoint(checkpoint_dir, fp):
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler)
        state.setdefault("step_times", [])
        print(f"resuming from {checkpoint} (step {state['step']} of {max_steps})")
        return state, state["step"]
    return state, None


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


def _optimizer_step(
    model,
    plain,
    params,
    optimizer,
    scheduler,
    scaler,
    autocast,
    next_batch,
    tc,
    step: int,
    checkpoint_dir: Path,
):
    """One optimizer step over grad_accum micro-batches on every process; returns the global step's
    mean loss and its useful (non-padding) tokens, the same on every process."""
    accelerator = distributed.accelerator()
    processes, rank = accelerator.num_processes, accelerator.process_index
    loss_sum, tokens = torch.zeros((), device=device()), 0
    for micro in range(tc.grad_accum):
        batch, useful = next_batch(distributed.micro_batch_index(step, micro, tc.grad_accum, rank, processes))
        # passage boundaries from the host copy: the kernel needs the longest as a Python int
        segments = packed_segments(batch["position_ids"]) if "position_ids" in batch else None
        batch, segments = to_device(batch), to_device(segments)
        with autocast:
            loss = micro_batch_loss(model, batch, tc, segments)
        scaler.scale(loss / tc.grad_accum).backward()
        loss_sum += loss.detach().float()  # read once per step: no host sync per micro-batch
        tokens += useful  # padding never counts
    # the global step's loss and tokens, the same on every process (one host sync)
    total_loss, total_tokens = accelerator.reduce(
        torch.stack([loss_sum, loss_sum.new_tensor(tokens)]), reduction="sum"
    ).tolist()
    train_loss, tokens = total_loss / tc.grad_accum / processes, int(total_tokens)
    scaler.unscale_(optimizer)  # true gradients for the checks and clipping (a no-op without fp16)
    _check_gradients(plain, step + 1)
    if not math.isfinite(train_loss):
        raise TrainingError(
            f"loss is {train_loss} at step {step + 1}; training stopped. The last good checkpoint "
            f"stays in {checkpoint_dir}. Try a lower train.lr or quant.bnb_4bit_compute_dtype=fp32."
        )
    optimizer_step(optimizer, scheduler, scaler, params, tc.max_grad_norm)
    return train_loss, tokens


def optimizer_step(optimizer, scheduler, scaler, params: list, max_grad_norm: float) -> None:
    """Clip the unscaled gradients, step the optimizer and the schedule, clear the gradients: the
    end of every training step, SFT's and preference tuning's."""
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale lowered
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _record_step(state: dict, train_loss: float, tokens: int, seconds: float) -> int:
    """Count a finished step in the training state (what a checkpoint saves); returns its number."""
    state["step"] = step = state["step"] + 1
    state["tokens"] += tokens
    state["seconds"] += seconds
    state["step_times"].append({"step": step, "seconds": seconds, "tokens": tokens})
    state["train_curve"].append({"step": step, "loss": train_loss})
    return step


def unchanged_matrices(final: dict, initial: dict) -> list[str]:
    """Guard against silently frozen layers (the bitsandbytes CPU repack bug, a bad target list):
    every LoRA matrix must have moved from its initial value."""
    unchanged = [n for n, v in final.items() if torch.equal(v, initial[n])]
    if unchanged:
        raise TrainingError(f"{len(unchanged)} LoRA matrices never changed, e.g. {unchanged[:3]}")
    return unchanged
