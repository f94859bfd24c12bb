"""The checkpoint format every stage reads and writes: dtype names, the tokenizer beside the
weights, and the error for a model that cannot be found or loaded."""

from __future__ import annotations

from pathlib import Path

import torch

from lmtune import LmtuneError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelError(LmtuneError, ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """save_pretrained, keeping a SentencePiece model (tokenizer.model) the tokenizer came with:
    transformers 5 writes only tokenizer.json, and llama.cpp's converter needs the SentencePiece
    scores from tokenizer.model to tokenize as the model was trained (without them it guesses)."""
    import shutil

    tokenizer.save_pretrained(out_dir)
    spm = getattr(tokenizer, "vocab_file", None)
    target = Path(out_dir) / "tokenizer.model"
    if spm and Path(spm).is_file() and Path(spm).resolve() != target.resolve():
        shutil.copyfile(spm, target)
