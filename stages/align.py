"""Preference-tune a LoRA adapter (DPO, IPO, SimPO, ORPO or KTO) on the quantized base → models/aligned.

    python stages/align.py [key=value ...]    # runs when align != none: make run ARGS="align=dpo align.beta=0.2"

Starts from the SFT adapter (align.start=sft) or a fresh one on the base, trains on the pairs of
data/pairs against the reference log-probabilities stored there, with many pairs' chosen and
rejected responses packed in one row. Each step's loss, rewards, margins and reward accuracy reach
the pipeline's MLflow run; killed midway, it resumes from its last checkpoint. metrics/align.json
holds the curve and the held-out pairs scored by the quantized base alone, by the reference (the
starting policy) and by the tuned adapter.
"""

import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

import pandas as pd

from lmtune.align.loop import held_out_markdown, held_out_scores, score_pairs, start_policy, train_preferences
from lmtune.align.losses import PAIRED_SLOTS, UNPAIRED_SLOTS
from lmtune.align.sources import read_split
from lmtune.artifacts import atomic_dir, save_config, write_json, write_text
from lmtune.checkpoint import load_tokenizer, save_tokenizer
from lmtune.model.lora import save_adapter
from lmtune.pipeline.runner import run_stage, stage_params
from lmtune.track import runs as tracking
from lmtune.train.engine import precision

STAGE = Path(__file__).stem  # its params (what its output folder records): dvc.yaml's list


def run(cfg) -> dict:
    paths, a = cfg.paths, cfg.align
    tokenizer = load_tokenizer(paths.base)
    train_pairs, train_reference = read_split(paths.pairs, "train")
    test_pairs, test_reference = read_split(paths.pairs, "test")
    model, packed = start_policy(cfg, trainable=True)
    checkpoints = Path(paths.checkpoints) / "align"
    result = train_preferences(
        model,
        train_pairs,
        train_reference,
        cfg,
        packed,
        checkpoints,
        tokenizer.pad_token_id,
        tracking.step_logger(),
    )
    autocast, _ = precision(cfg)  # as the reference was scored
    labels = test_reference.get("label")  # held-out KTO examples (unpaired files); else pairs
    names = UNPAIRED_SLOTS if labels is not None else PAIRED_SLOTS  # kto holds out pairs, too
    scored = {}
    for name in ("base", "aligned"):
        with model.disable_adapter() if name == "base" else nullcontext():  # base: as training sees it
            scored[name] = score_pairs(
                model, test_pairs, tokenizer.pad_token_id, packed, f"held-out, {name}", autocast, names
            )
    scored["reference"] = test_reference
    held_out = {
        name: held_out_scores(scored[name], test_reference, a.beta, 1000, cfg.seed, labels)
        for name in ("base", "reference", "aligned")
    }
    with atomic_dir(paths.aligned) as out:
        save_adapter(model, out)
        save_tokenizer(tokenizer, out)
        save_config(cfg, out, stage_params(STAGE))
    metrics_dir = Path(paths.metrics)
    pd.DataFrame(result.pop("curve")).to_csv(metrics_dir / "align_loss.csv", index=False)
    metrics = {**result, "method": a.method, "start": a.start, "packed": packed, "held_out": held_out}
    write_json(metrics_dir / "align.json", metrics)
    write_text(
        metrics_dir / "align.md", held_out_markdown(held_out, a.method, result["steps"], len(test_pairs))
    )
    shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is safe; resume state is not needed
    return {
        "final_loss": result["final"]["loss"],
        "held_out": {k: {m: v[m]["value"] for m in v if "accuracy" in m} for k, v in held_out.items()},
    }


if __name__ == "__main__":
    sys.exit(run_stage(run))
