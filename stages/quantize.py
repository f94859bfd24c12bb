"""Post-training quantization: models/merged → models/quantized (torchao safetensors, or GGUF).

    python stages/quantize.py [key=value ...]    # e.g. quantize=int8_dynamic, quantize=gguf_q8_0

After quant=qat_int4 training this is the conversion to the int4 weights QAT trained for.

metrics/quantize.json: method, format, size on disk of merged and quantized, load time (GGUF: in
llama.cpp, and how many tensors each type holds).
The eval stage scores the quantized model next to the others.
"""

import sys
import time
from pathlib import Path

from lmtune.artifacts import atomic_dir, save_config, write_json
from lmtune.checkpoint import load_tokenizer, save_tokenizer
from lmtune.export.quantize import folder_mb, load_quantized, quantize
from lmtune.model.hardware import resolve_dtype
from lmtune.pipeline.runner import run_stage, stage_params

STAGE = Path(__file__).stem  # its params (what its output folder records): dvc.yaml's list


def run(cfg) -> dict:
    paths, dtype = cfg.paths, resolve_dtype(cfg.quantize.dtype)
    with atomic_dir(paths.quantized) as out:
        metrics = quantize(paths.merged, out, cfg.quantize.method, dtype, cfg.quantize.group_size)
        save_tokenizer(load_tokenizer(paths.merged), out)
        save_config(cfg, out, stage_params(STAGE))
        began = time.perf_counter()
        model = load_quantized(out, dtype)  # it must load (transformers, or llama.cpp for GGUF) to be done
        if hasattr(model, "close"):
            model.close()
        metrics["load_seconds"] = time.perf_counter() - began
    metrics["merged_mb"] = folder_mb(paths.merged)
    metrics["quantized_mb"] = folder_mb(paths.quantized)
    metrics["size_ratio"] = metrics["quantized_mb"] / metrics["merged_mb"]
    write_json(Path(paths.metrics) / "quantize.json", metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(run))
