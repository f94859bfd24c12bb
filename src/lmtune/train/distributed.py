"""Training on several processes through accelerate: DDP, or FSDP for a base too big for one card.

`python stages/finetune.py` with train.distributed=ddp|fsdp relaunches itself under `accelerate
launch` (conf/accelerate/<kind>.yaml, train.num_processes processes); the processes it starts
(workers: torchrun's WORLD_SIZE is set) train together, and only the main one writes outputs. The
global batch is train.batch_size x train.grad_accum x train.num_processes x train.num_nodes: each
process reads its own micro-batches of the one seeded order (see `micro_batch_index`).

With train.num_nodes > 1 the stage runs on every node (conf/slurm/finetune.sbatch); each node's
launch joins the others through accelerate's multi-node flags: its rank from SLURM's environment and
the main node's address from the allocation's node list (through scontrol), or LMTUNE_NODE_RANK and
LMTUNE_MAIN_ADDR where no scheduler is. Only node 0 writes outputs and the MLflow run.
"""

from __future__ import annotations

import os
import re
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


def node_rank() -> int:
    """This machine's place among train.num_nodes: LMTUNE_NODE_RANK by hand, else SLURM's node id."""
    return int(os.environ.get("LMTUNE_NODE_RANK", os.environ.get("SLURM_NODEID", "0")))


def is_main() -> bool:
    """The process that writes outputs: rank 0 of the launched processes, or, before the launch,
    the stage on node 0."""
    return process().is_main_process and (in_worker() or node_rank() == 0)


MAIN_PORT = 29500


def nodes(cfg: DictConfig) -> list[str]:
    """accelerate launch's multi-node flags for this node (none for one node): its rank, the main
    node's address and port. Refuses, saying how to start it, when they cannot be known."""
    count = cfg.train.num_nodes
    if count == 1:
        return []
    if "SLURM_NNODES" in os.environ and int(os.environ["SLURM_NNODES"]) != count:
        raise DistributedError(
            f"train.num_nodes={count}, but this SLURM allocation has {os.environ['SLURM_NNODES']} nodes: "
            f"sbatch --nodes={count} (or set train.num_nodes to the allocation's)"
        )
    address = os.environ.get("LMTUNE_MAIN_ADDR")
    if not address and "SLURM_JOB_NODELIST" in os.environ:
        address = first_node_address(os.environ["SLURM_JOB_NODELIST"])
    if not address:
        raise DistributedError(
            f"train.num_nodes={count}: start this stage on every node, under SLURM "
            "(sbatch conf/slurm/finetune.sbatch) or with LMTUNE_NODE_RANK (0 on the main node) and "
            "LMTUNE_MAIN_ADDR (its address) set on each"
        )
    port = os.environ.get("LMTUNE_MAIN_PORT", str(MAIN_PORT))
    return [
        "--num_machines", str(count), "--machine_rank", str(node_rank()),
        "--main_process_ip", address, "--main_process_port", port,
    ]  # fmt: skip


def first_node_address(node_list: str) -> str | None:
    """The main node of a SLURM allocation (the first of its node list) at the address SLURM itself
    reaches it by: its NodeAddr, which is its name unless slurm.conf sets another (its name, too,
    where scontrol has no record of it). None where scontrol cannot list the nodes."""

    def scontrol(*args: str) -> str:
        try:
            done = subprocess.run(["scontrol", *args], capture_output=True, text=True)
        except FileNotFoundError:  # SLURM's variables, but not its commands
            return ""
        return done.stdout if done.returncode == 0 else ""

    names = scontrol("show", "hostnames", node_list).split()
    if not names:
        return None
    record = re.search(r"\bNodeAddr=(\S+)", scontrol("--oneliner", "show", "node", names[0]))
    return record.group(1) if record else names[0]


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
        processes = cfg.train.num_processes * cfg.train.num_nodes  # accelerate counts them all
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / f"{kind}.yaml"),
            "--num_processes",
            str(processes),
            *nodes(cfg),
            script,
            f"{RESOLVED}={resolved.name}",
        ]
        on = f" on node {node_rank()} of {cfg.train.num_nodes}" if cfg.train.num_nodes > 1 else ""
        print(
            f"launching {cfg.train.num_processes} processes ({kind}){on}: {' '.join(command[2:])}", flush=True
        )
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
