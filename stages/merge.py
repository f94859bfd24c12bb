"""Merge the LoRA adapter into the base reloaded in 16/32-bit → models/merged.

    python stages/merge.py [key=value ...]       # e.g. merge.dtype=bf16

Never merges into 4-bit weights (that shifts logits by ~1e-1). metrics/merge.json records the
largest logit difference between the merged model and base+adapter on held-out passages. With
merge.device=auto a base too large for the GPU in merge.dtype (a 7B in fp32: 27 GB) merges on the
CPU.
"""

import sys
from pathlib import Path

import torch

from lmtune.artifacts import atomic_dir, save_config, write_json
from lmtune.checkpoint import DTYPES, load_tokenizer, save_tokenizer
from lmtune.data.batching import collate
from lmtune.data.sequences import read_sequences
from lmtune.model.hardware import placement
from lmtune.model.load import load_base_with_adapter
from lmtune.pipeline.runner import run_stage, stage_params

STAGE = Path(__file__).stem  # its params (what its output folder records): dvc.yaml's list


def run(cfg) -> dict:
    paths = cfg.paths
    tokenizer = load_tokenizer(paths.policy)
    dtype = DTYPES[cfg.merge.dtype]
    on = placement(paths.base, dtype, cfg.merge.device)
    print(f"merging in {cfg.merge.dtype} on {on}", flush=True)
    model = load_base_with_adapter(paths.base, paths.policy, dtype, on=on)
    seqs = read_sequences(paths.processed, "validation")[: cfg.merge.check_passages]
    batch = collate(seqs, tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"].to(on), "attention_mask": batch["attention_mask"].to(on)}
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        unmerged = model(**inputs).logits.float()[mask]
        merged = model.merge_and_unload()
        after = merged(**inputs).logits.float()[mask]
    metrics = {
        "max_logit_diff": float((after - unmerged).abs().max()),
        "dtype": cfg.merge.dtype,
        "device": on.type,
        "check_tokens": int(mask.sum()),
    }
    with atomic_dir(paths.merged) as out:
        merged.save_pretrained(out, safe_serialization=True)
        save_tokenizer(tokenizer, out)
        save_config(cfg, out, stage_params(STAGE))
    write_json(Path(paths.metrics) / "merge.json", metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(run))
