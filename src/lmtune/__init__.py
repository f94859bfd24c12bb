"""lmtune: reproducible QLoRA fine-tuning of Llama-family models (DVC + Hydra + MLflow)."""

import os

# Offline by default: nothing in the default pipeline may reach a model hub at run time.
# A user with hub access opts in with HF_HUB_OFFLINE=0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A tracking server that goes away must not stall training for minutes of HTTP retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

__version__ = "0.1.0"


class LmtuneError(Exception):
    """A problem the user can fix (config, data, model, store): the stage runner prints its message,
    which names the key, file or line and what to do, instead of a traceback. Each module raises
    its own subclass, so the runner catches them all without importing every module."""
