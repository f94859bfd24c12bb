"""Where models run: this process among the launched ones and its device, the fast dtype of the
hardware, threads, whether a whole model fits the GPU."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import torch

from lmtune.checkpoint import DTYPES


def process():
    """This process among those a launcher started (accelerate's PartialState: process_index,
    num_processes, is_main_process, local_process_index); one of one when nothing launched it.
    Under `accelerate launch` the first call joins the process group (gloo on CPUs, NCCL on GPUs)."""
    from accelerate import PartialState

    # cpu=True where there is no GPU: without it, launched processes would each train alone
    return PartialState(cpu=not torch.cuda.is_available())


def device() -> torch.device:
    """The GPU of this process (its local index picks it among several), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", process().local_process_index)
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX (figures in bench/RESULTS.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` = bf16 where the hardware runs it fast, else fp32."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def weights_gib(path: str | Path, dtype: torch.dtype) -> float:
    """Size of the safetensors weights in `path` once loaded in `dtype`, read from the headers only."""
    from safetensors import safe_open

    count = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            count += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return count * dtype.itemsize / 2**30


def placement(path: str | Path, dtype: torch.dtype, choice: str) -> torch.device:
    """Where a whole model in `dtype` goes: `cpu`, `cuda`, or `auto` (the GPU if the weights and a
    fifth more for the activations fit in its free memory, else the CPU)."""
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if choice == "auto":
        free, _ = torch.cuda.mem_get_info(device())
        if 1.2 * weights_gib(path, dtype) * 2**30 > free:
            return torch.device("cpu")
    return device()


def free_device_memory() -> float | None:
    """Hand the memory of models already dropped back to the GPU, so the next one starts clean;
    the GiB still allocated after (None on the CPU)."""
    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device()) / 2**30
