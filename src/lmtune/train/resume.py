"""Resumable checkpoints of a training run: LoRA weights, optimizer, scheduler, loss scaler, RNG
states and the run's state (step, curves), under a fingerprint of the training config and data,
so a checkpoint is only ever resumed by the run that made it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from lmtune.config import identity
from lmtune.model.lora import lora_state
from lmtune.train import TrainingError


def fingerprint(cfg: DictConfig, train_seqs: list[list[int]]) -> str:
    """What a checkpoint must match to be resumed: the identity of everything that shapes training,
    the training data itself included (an edited data set must not resume an old run)."""
    digest = hashlib.sha256(identity(cfg, ("seed", "model", "data", "quant", "lora", "train")).encode())
    for seq in train_seqs:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
        mask = getattr(seq, "mask", None)
        digest.update(b"|" + (np.asarray(mask, dtype=np.int8).tobytes() if mask is not None else b"") + b";")
    return digest.hexdigest()[:16]


def save_checkpoint(directory: Path, model, optimizer, scheduler, scaler, state: dict, keep: int) -> None:
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


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> dict:
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
