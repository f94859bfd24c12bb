"""Post-training quantization of the merged model with torchao (CPU kernels exist for int8)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lmtune.modeling import ModelError, device

# method → torchao config class name. Packed int4 has no CPU kernel in torchao 0.18 (measured),
# so int4 is refused on CPU before any work, naming what works instead.
METHODS = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "int4_weight_only": "Int4WeightOnlyConfig",
}
NEEDS_CUDA = {"int4_weight_only"}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ModelError(f"quantize.method={method}: unknown; choose one of {', '.join(METHODS)}")
    if method in NEEDS_CUDA and not torch.cuda.is_available():
        cpu_ok = [m for m in METHODS if m not in NEEDS_CUDA]
        raise ModelError(
            f"quantize.method={method}: torchao has no CPU kernel for it on this machine; "
            f"use {' or '.join(cpu_ok)} on CPU, or run on a CUDA GPU"
        )


def folder_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def quantize(merged_dir: str | Path, out_dir: Path, method: str, dtype: torch.dtype) -> dict:
    """Load the merged model quantized by torchao and save it (safetensors) to `out_dir`."""
    import torchao.quantization as tq
    from transformers import AutoModelForCausalLM, TorchAoConfig

    check_method(method)
    config = TorchAoConfig(quant_type=getattr(tq, METHODS[method])())
    began = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir,
        dtype=dtype,
        quantization_config=config,
        device_map={"": str(device())},
        use_safetensors=True,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return {"method": method, "format": f"torchao {METHODS[method]}, safetensors",
            "quantize_seconds": time.perf_counter() - began}  # fmt: skip


def load_quantized(path: str | Path, dtype: torch.dtype):
    """A model saved by `quantize`: plain transformers loading, the torchao config travels along."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map={"": str(device())}, use_safetensors=True
    )
    return model.eval()
