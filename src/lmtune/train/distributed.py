"""Training on several processes through accelerate: DDP, or FSDP for a base too big for one card.

`python stages/finetune.py` with train.distributed=ddp|fsdp relaunches itself under `accelerate
launch` (conf/accelerate/<kind>.yaml, train.num_processes processes); the processes it starts
(workers: torchrun's WORLD_SIZE is set) train together, and only the main one writes outputs. The
global batch is train.batch_size x train.grad_accum x train.num_processes, whatever the count of
processes: each one reads its own micro-batches of the one seeded order (see `micro_batch_index`).
"""

from __future__ import annotations

import subprocess
import sys

import torch
from omegaconf import DictConfig, OmegaConf

from lmtune import LmtuneError
from lmtune.config import ROOT
from lmtune.model.hardware import process

CONFIGS = ROOT / "conf" / "accelerate"
RESOLVED = "--resolved-config"  # how a launched worker is handed the launching stage's config


class DistributedError(LmtuneError, RuntimeError):
    """Distributed training cannot start or did not finish."""


def in_worker() -> bool:
    """Whether this process is one of several a launcher started (torchrun / accelerate launch)."""
    return process().num_processes > 1


def is_main() -> bool:
    return process().is_main_process


def micro_batch_index(step: int, micro: int, grad_accum: int, rank: int = 0, processes: int = 1) -> int:
    """The global index of process `rank`'s `micro`-th micro-batch of optimizer step `step`: the
    step covers grad_accum x processes consecutive micro-batches of the seeded order, dealt out in
    turn, so N processes see exactly the passages one process sees with N times the accumulation."""
    return step * grad_accum * processes + micro * processes + rank


def launch(cfg: DictConfig, script: str) -> None:
    """Run `script` again under `accelerate launch` on exactly this resolved config (handed over as
    a file); returns when all processes are done."""
    import tempfile

    kind = cfg.train.distributed
    if kind == "fsdp":
        if not torch.cuda.is_available():
            raise DistributedError(
                "train.distributed=fsdp shards the base over GPUs and needs CUDA; "
                "on CPU use train.distributed=ddp"
            )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="lmtune-config-") as resolved:
        resolved.write(OmegaConf.to_yaml(cfg, resolve=True))
        resolved.flush()
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / f"{kind}.yaml"),
            "--num_processes",
            str(cfg.train.num_processes),
            script,
            f"{RESOLVED}={resolved.name}",
        ]
        print(f"launching {cfg.train.num_processes} processes ({kind}): {' '.join(command[2:])}", flush=True)
        failed = subprocess.run(command).returncode != 0
    if failed:
        raise DistributedError(
            f"distributed training ({kind}, {cfg.train.num_processes} processes) failed: "
            "see the processes' messages above"
        )


def accelerator():
    """accelerate's Accelerator for this process: DDP or FSDP (as `accelerate launch` configured it)
    across launched processes, nothing to wrap in one process. Its mixed precision stays off:
    lmtune's autocast sets the dtypes."""
    from accelerate import Accelerator

    process()  # the process group, with lmtune's choice of CPU or GPU, before accelerate's own
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
