"""Post-training quantization of the merged model (torchao, bitsandbytes, GGUF) and loading it back."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lmtune.checkpoint import ModelError
from lmtune.config import QUANTIZE_METHODS
from lmtune.model.hardware import device
from lmtune.model.load import from_pretrained
from lmtune.model.qat import int4_weight_config

GGUF_FILE = "model.gguf"
# int4 uses torchao's IntxWeightOnly layout (int4 values, one scale per group, dequantized at matmul
# time): it runs on CPU and CUDA, and QAT can fake-quantize exactly the same numerics. torchao's
# packed int4 kernels (tinygemm) are CUDA-only, and QAT cannot target its CPU one.
METHODS = QUANTIZE_METHODS  # method → what is written


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ModelError(f"quantize.method={method}: unknown; choose one of {', '.join(METHODS)}")


def torchao_config(method: str, group_size: int = 32):
    import torchao.quantization as tq

    if method == "int4_weight_only":
        return int4_weight_config(group_size)
    return {
        "int8_weight_only": tq.Int8WeightOnlyConfig,
        "int8_dynamic": tq.Int8DynamicActivationInt8WeightConfig,
    }[method]()


def folder_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def quantize(
    merged_dir: str | Path, out_dir: Path, method: str, dtype: torch.dtype, group_size: int = 32
) -> dict:
    """Write the merged model quantized by `method` to `out_dir` (safetensors, or one GGUF file)."""
    check_method(method)
    began = time.perf_counter()
    if method.startswith("gguf_"):
        from lmtune.export.gguf import export_gguf

        metrics = export_gguf(merged_dir, out_dir / GGUF_FILE, method.removeprefix("gguf_"))
        return {
            "method": method,
            "format": METHODS[method],
            "quantize_seconds": time.perf_counter() - began,
            **{k: v for k, v in metrics.items() if k != "format"},
        }
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if method == "bnb_nf4":  # the QLoRA storage format, for serving with bitsandbytes (CUDA; CPU works too)
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        config = TorchAoConfig(quant_type=torchao_config(method, group_size))
    model = from_pretrained(
        merged_dir, dtype=dtype, quantization_config=config, device_map={"": str(device())}
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return {
        "method": method,
        "format": f"{METHODS[method]}, safetensors",
        "quantize_seconds": time.perf_counter() - began,
    }


def load_quantized(path: str | Path, dtype: torch.dtype, n_ctx: int = 512):
    """A model saved by `quantize`: with plain transformers (the torchao config travels along in
    config.json), or a GGUF file in llama.cpp, where its users run it (a GGUFModel)."""
    path = Path(path)
    if (path / GGUF_FILE).is_file():
        from lmtune.export.llamacpp import GGUFModel

        return GGUFModel(path / GGUF_FILE, n_ctx)
    return from_pretrained(path, dtype=dtype, device_map={"": str(device())}).eval()
