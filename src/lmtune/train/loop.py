"""The LoRA training loop: seeded data order, validation at intervals, exact resume, guards."""

from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmtune import LmtuneError
from lmtune.data.batching import batch_indices, collate, collate_rows, pack
from lmtune.model.hardware import device, free_device_memory, resolve_dtype
from lmtune.model.load import set_recompute
from lmtune.model.lora import lora_state
from lmtune.train import distributed
from lmtune.train.kernels import chunked_cross_entropy, packed_segments, register_varlen_attention

WARMUP_STEPS = 5  # steps left out of the steady rate: first kernels, allocator growth, caches


class TrainingError(LmtuneError, RuntimeError):
    """Training cannot go on (non-finite loss, a LoRA matrix that never learned, bad checkpoint)."""


def peak_memory_gib() -> float:
    """Peak allocated GPU memory, or peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def fingerprint(cfg: DictConfig, train_seqs: list[list[int]]) -> str:
    """What a checkpoint must match to be resumed: everything that shapes training, the training
    data itself included (an edited data set must not resume an old run)."""
    keys = ("seed", "model", "data", "quant", "lora", "train")
    relevant = OmegaConf.to_container(cfg, resolve=True)
    relevant = {k: relevant[k] for k in keys}
    for volatile in ("threads", "checkpoint_every", "keep_checkpoints"):
        relevant["train"].pop(volatile, None)
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    for seq in train_seqs:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
        mask = getattr(seq, "mask", None)
        digest.update(b"|" + (np.asarray(mask, dtype=np.int8).tobytes() if mask is not None else b"") + b";")
    return digest.hexdigest()[:16]


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


def _save_checkpoint(directory: Path, model, optimizer, scheduler, scaler, state: dict, keep: int) -> None:
    final = directory / f"step-{state['step']:06d}"
    tmp = directory / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in lora_state(model).items()}, tmp / "lora.safetensors")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        },
        tmp / "optim.pt",
    )
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint exists only once complete
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: Path, fp: str) -> Path | None:
    """The newest complete checkpoint made with the same training config, if any."""
    for candidate in sorted(directory.glob("step-*"), reverse=True):
        try:
            state = json.loads((candidate / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("fingerprint") == fp:
            return candidate
    return None


def _load_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> dict:
    try:
        weights = load_file(path / "lora.safetensors")
        optim = torch.load(path / "optim.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable checkpoint
        raise TrainingError(
            f"checkpoint {path} is corrupted ({type(err).__name__}: {err}). "
            f"Delete it (rm -r {path}) to resume from an older one or start over."
        ) from None
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise TrainingError(
            f"checkpoint {path} does not match the model ({sorted(missing)[:3]} ...); delete it"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    if optim.get("scaler"):  # fp16 only: the loss scale it had reached
        scaler.load_state_dict(optim["scaler"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


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


def collate_micro_batch(picked: list[list[int]], tc: DictConfig, pad_id: int) -> dict:
    """One micro-batch's tensors from its passages. Packed or padded, it holds the same passages;
    packing only removes the padding. With varlen attention, whose cost does not depend on row
    length, they go in one row; the sdpa path packs them into rows of train.pack_length to bound
    its dense mask."""
    if not tc.packing:
        return collate(picked, pad_id)
    return collate_rows([picked] if tc.attention == "varlen" else pack(picked, tc.pack_length), pad_id)


def batch_maker(train_seqs: list[list[int]], cfg: DictConfig, pad_id: int):
    """index → (micro-batch tensors, useful tokens): a pure function of (seed, index), so a resumed
    run sees the same data; train.batch_size passages per micro-batch."""
    tc = cfg.train

    def make(index: int) -> tuple[dict, int]:
        picked = [train_seqs[i] for i in batch_indices(len(train_seqs), tc.batch_size, cfg.seed, index)]
        return collate_micro_batch(picked, tc, pad_id), sum(len(s) for s in picked)

    return make


def to_device(batch: dict | None) -> dict | None:
    """Host tensors to the training device; on a GPU from pinned memory, without blocking the host."""
    if batch is None or device().type != "cuda":
        return batch
    return {
        k: v.pin_memory().to(device(), non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def prepare_model(model, tc: DictConfig) -> None:
    """Packed rows get per-passage (varlen) attention when train.attention=varlen."""
    if tc.packing and tc.attention == "varlen":
        model.get_base_model().set_attn_implementation(register_varlen_attention())


def micro_batch_loss(model, batch: dict, tc: DictConfig, segments: dict | None = None) -> torch.Tensor:
    """Mean next-token loss of one micro-batch. Packed rows pass their passage boundaries
    (`segments`, from packed_segments on the host batch) down to the attention; with
    train.chunked_loss a frozen plain head computes its loss in chunks. No KV cache: with one,
    transformers ignores the packed positions and rows attend across."""
    extra = segments or {}
    if segments is None and "position_ids" in batch:
        extra = packed_segments(batch["position_ids"].cpu())
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel | FullyShardedDataParallel):
        # through the wrapper's own forward, which gradient synchronisation hooks into
        return model(**batch, use_cache=False, **extra).loss
    base = model.get_base_model()
    head = base.get_output_embeddings()
    plain_head = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
    if tc.chunked_loss and plain_head and getattr(base.config, "final_logit_softcapping", None) is None:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = base.base_model(**inputs, use_cache=False, **extra).last_hidden_state
        return chunked_cross_entropy(hidden, head.weight, batch["labels"])
    return model(**batch, use_cache=False, **extra).loss


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
    from transformers import get_cosine_schedule_with_warmup

    tc = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    accelerator = distributed.accelerator()  # one process, or several under DDP/FSDP: one path
    processes, rank = accelerator.num_processes, accelerator.process_index
    # fused AdamW: one kernel for all LoRA tensors on a card (not under DDP/FSDP's wrappers)
    fused = device().type == "cuda" and processes == 1
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused or None)
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    # LoRA weights stay fp32 for the optimizer while the base computes in 16 bits. Under autocast
    # the adapter matmuls run in 16 bits too, and peft skips casting every layer's whole input to
    # fp32 and back (measured 1.3x per step on this CPU). fp16 (cards without bf16: T4, V100)
    # overflows and underflows where bf16 does not: its gradients go through a loss scaler.
    compute = resolve_dtype(cfg.quant.bnb_4bit_compute_dtype)
    half = compute in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(device().type, dtype=compute) if half else nullcontext()
    scaler = torch.amp.GradScaler(device().type, enabled=compute == torch.float16)
    initial = lora_state(model)  # LoRA init is seeded, so this holds after a resume too
    fp = fingerprint(cfg, train_seqs)
    state = {
        "step": 0,
        "fingerprint": fp,
        "train_curve": [],
        "val_curve": [],
        "tokens": 0,
        "seconds": 0.0,
        "step_times": [],
    }
    resumed_from = None
    if checkpoint := latest_checkpoint(checkpoint_dir, fp):
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, scaler)
        state.setdefault("step_times", [])
        resumed_from = state["step"]
        print(f"resuming from {checkpoint} (step {resumed_from} of {tc.max_steps})")

    next_batch = batch_maker(train_seqs, cfg, pad_id)
    prepare_model(model, tc)
    # gradient_checkpointing=auto under DDP/FSDP keeps every layer recomputed (measured in one process only)
    every_n = tc.recompute_every_n_layers if tc.gradient_checkpointing is True else None
    if tc.gradient_checkpointing == "auto":
        every_n = 1
    recompute = {"recompute": recompute_name(every_n, tc.offload_activations)}
    if tc.gradient_checkpointing == "auto" and processes == 1:
        longest = sorted(train_seqs, key=len, reverse=True)[: tc.batch_size]
        recompute = choose_recompute(model, longest, tc, pad_id, autocast, tc.memory_budget_gib)
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
        step = state["step"]
        started = time.perf_counter()
        loss_sum, tokens = torch.zeros((), device=device()), 0
        for micro in range(tc.grad_accum):
            batch, useful = next_batch(
                distributed.micro_batch_index(step, micro, tc.grad_accum, rank, processes)
            )
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
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale lowered
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state["step"] = step = step + 1
        seconds = time.perf_counter() - started
        state["tokens"] += tokens
        state["seconds"] += seconds
        state["step_times"].append({"step": step, "seconds": seconds, "tokens": tokens})
        state["train_curve"].append({"step": step, "loss": train_loss})
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
                _save_checkpoint(
                    checkpoint_dir, plain, optimizer, scheduler, scaler, state, tc.keep_checkpoints
                )
            accelerator.wait_for_everyone()
    bar.close()

    # Guard against silently frozen layers (the bitsandbytes CPU repack bug, a bad target list):
    # every LoRA matrix must have moved from its initial value.
    final = lora_state(plain)
    unchanged = [n for n, v in final.items() if torch.equal(v, initial[n])]
    if unchanged:
        raise TrainingError(f"{len(unchanged)} LoRA matrices never changed, e.g. {unchanged[:3]}")
    return {
        "steps": state["step"],
        "resumed_from_step": resumed_from,
        "final_train_loss": state["train_curve"][-1]["loss"],
        "final_val_loss": state["val_curve"][-1]["loss"],
        "train_tokens": state["tokens"],
        "train_seconds": state["seconds"],
        "tokens_per_second": state["tokens"] / max(state["seconds"], 1e-9),
        **steady_rate(state["step_times"], WARMUP_STEPS),
        **recompute,
        "lora_matrices": len(final),
        "lora_matrices_unchanged": len(unchanged),
        "train_curve": state["train_curve"],
        "val_curve": state["val_curve"],
        "step_times": state["step_times"],
    }
