"""lmtune: reproducible QLoRA fine-tuning of Llama-family models (DVC + Hydra + MLflow)."""

import logging
import os
import warnings

# Offline by default: nothing in the default pipeline may reach a model hub at run time.
# A user with hub access opts in with HF_HUB_OFFLINE=0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A tracking server that goes away must not stall training for minutes of HTTP retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

# Known third-party noise that would bury a stage's own lines, silenced by name (nothing else is):
# torchao's CUDA-only kernels that a CPU build cannot load, torch's notice about enums torchao
# registers, bitsandbytes' optional hub kernel (never fetched: offline), transformers' rename notice.
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings(
    "ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning
)

__version__ = "0.1.0"


class LmtuneError(Exception):
    """A problem the user can fix (config, data, model, store): the stage runner prints its message,
    which names the key, file or line and what to do, instead of a traceback. Each module raises
    its own subclass, so the runner catches them all without importing every module."""


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off (HF_HUB_OFFLINE, default 1 above): the one reading of
    it, for models, data and benchmarks alike; `0`, `false` or empty turn the hub on."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "")
