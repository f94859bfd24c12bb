"""Training on several processes through accelerate: DDP, or FSDP for a base too big for one card.

`python stages/finetune.py` with train.distributed=ddp|fsdp relaunches itself under `accelerate
launch` (conf/accelerate/<kind>.yaml, train.num_processes processes); the processes it starts
(workers: torchrun's WORLD_SIZE is set) train together, and only the main one writes outputs. The
global batch is train.batch_size x train.grad_accum x train.num_processes, whatever the count of
processes: each one reads its own micro-batches of the one seeded order (see `micro_batch_index`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from lmtune import LmtuneError

CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "accelerate"
RESOLVED = "--resolved-config"  # how a launched worker is handed the launching stage's config


class DistributedError(LmtuneError, RuntimeError):
    """Distributed training cannot start or did not finish."""


def in_worker() -> bool:
    """Whether this process was started by a launcher (torchrun / accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_and_size() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank_and_size()[0] == 0


def micro_batch_index(step: int, micro: int, grad_accum: int) -> int:
    """The global index of this process's `micro`-th micro-batch of optimizer step `step`: the step
    covers grad_accum x processes consecutive micro-batches of the seeded order, dealt out in turn,
    so N processes see exactly the passages one process sees with N times the accumulation."""
    rank, size = rank_and_size()
    return step * grad_accum * size + micro * size + rank


def launch(cfg: DictConfig, script: str) -> None:
    """Run `script` again under `accelerate launch` on exactly this resolved config (handed over as
    a file); returns when all processes are done."""
    import tempfile

    from omegaconf import OmegaConf

    kind = cfg.train.distributed
    if kind == "fsdp":
        import torch

        if not torch.cuda.is_available():
            raise DistributedError("train.distributed=fsdp shards the base over GPUs and needs CUDA; "
                                   "on CPU use train.distributed=ddp")  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="lmtune-config-") as resolved:
        resolved.write(OmegaConf.to_yaml(cfg, resolve=True))
        resolved.flush()
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(CONFIGS / f"{kind}.yaml"), "--num_processes", str(cfg.train.num_processes),
                   script, f"{RESOLVED}={resolved.name}"]  # fmt: skip
        print(f"launching {cfg.train.num_processes} processes ({kind}): {' '.join(command[2:])}", flush=True)
        failed = subprocess.run(command).returncode != 0
    if failed:
        raise DistributedError(f"distributed training ({kind}, {cfg.train.num_processes} processes) failed: "
                               "see the processes' messages above")  # fmt: skip


def accelerator(cfg: DictConfig):
    """accelerate's Accelerator for a worker (gloo on CPU, NCCL on GPUs), or None in one process."""
    if not in_worker():
        return None
    import torch
    from accelerate import Accelerator

    # cpu=True: without it, processes on a machine with no GPU would each train alone (gloo otherwise)
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="no"
    )  # lmtune's autocast sets dtypes
