"""The model forms the eval stage scores, by their names in metrics/eval.json, each with its role
(lmtune.config.EVAL_MODELS) and a loader: the base in 16/32-bit; the quantized base alone and with
the adapter exactly as trained (4/8-bit or QAT runs), and after preference tuning or RL with the
adapter they started from; the merged model; the merged model after
post-training quantization (a GGUF loads as a llama.cpp model, not a transformers one)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig

from lmtune.export.quantize import load_quantized
from lmtune.model.load import load_base_with_adapter, load_for_training, load_full


def model_loaders(cfg: DictConfig, dtype: torch.dtype, n_ctx: int = 512) -> dict[str, tuple[str, Callable]]:
    """name → (role, loader), in the order the stage scores them; `n_ctx`: a GGUF's llama.cpp context."""
    paths = cfg.paths
    loaders = {"base": ("base", lambda: load_full(paths.base, dtype))}
    quantized = cfg.quant.bits < 16 or cfg.quant.qat
    label = (f"qat_{cfg.quant.qat}" if cfg.quant.qat else f"{cfg.quant.bits}bit") if quantized else ""
    if quantized:  # the base as training saw it, alone and with the adapter
        loaders[f"base_{label}"] = ("quantized_base", lambda: load_for_training(paths.base, cfg.quant, False))
    rl_from_tuned = cfg.rl.method != "none" and cfg.rl.start == "tuned"
    if cfg.align.method != "none" or rl_from_tuned:  # the SFT adapter they started from, as trained
        loaders["_".join(filter(None, ("base", label, "sft")))] = (
            "sft",
            lambda: load_base_with_adapter(paths.base, paths.adapter, dtype, quant=cfg.quant),
        )
    if cfg.align.method != "none" and rl_from_tuned:  # the preference-tuned adapter RL started from
        loaders["_".join(filter(None, ("base", label, "aligned")))] = (
            "aligned",
            lambda: load_base_with_adapter(paths.base, paths.aligned, dtype, quant=cfg.quant),
        )
    if quantized:
        loaders[f"base_{label}_adapter"] = (
            "adapter",
            lambda: load_base_with_adapter(paths.base, paths.policy, dtype, quant=cfg.quant),
        )
    loaders["merged"] = ("merged", lambda: load_full(paths.merged, dtype))
    loaders[f"merged_{cfg.quantize.method}"] = (
        "quantized",
        lambda: load_quantized(paths.quantized, dtype, n_ctx),
    )
    return loaders
