"""What a run records of its configuration: the params it logs (secrets masked), the hash that
finds the same configuration's run again, and the name it is shown under."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from omegaconf import DictConfig

from lmtune.config import flatten, identity

# A name that is a credential as a whole word (hf_token, api_key), not one that merely contains it
# (eval.prompt_tokens, sample.max_new_tokens).
_SECRET = re.compile(r"(^|[._])(\w*_)?(token|password|passwd|secret|api_?key|credentials?)$", re.IGNORECASE)


def mlflow_name(key: str) -> str:
    """A param or metric name in the characters MLflow takes (`module:function` → `module_function`)."""
    return re.sub(r"[^\w\-. /]", "_", key)


def safe_params(cfg: DictConfig | dict) -> dict[str, Any]:
    """Flattened config without anything that looks like a secret, under names MLflow takes."""
    return {mlflow_name(k): ("***" if _SECRET.search(k) else v) for k, v in flatten(cfg).items()}


def params_hash(cfg: DictConfig) -> str:
    """The identity of a pipeline configuration (lmtune.config.identity) and the DVC experiment
    name: two experiments are two runs even with equal params."""
    key = f"{identity(cfg)}|{os.environ.get('DVC_EXP_NAME')}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def run_name(cfg: DictConfig, digest: str) -> str:
    """The DVC experiment's name, else the model, data, LoRA rank and quantization at a glance."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    bits = f"qat-{cfg.quant.qat}" if cfg.quant.qat else f"{cfg.quant.bits}bit"
    return f"{cfg.model.name}-{cfg.data.name}-r{cfg.lora.r}-{bits}-{digest[:6]}"
