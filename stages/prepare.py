"""Corpus → clean passages → seeded train/validation/test split → data/processed/*.parquet.

    python stages/prepare.py [key=value ...]     # e.g. data.passage_chars=400

Writes metrics/prepare.json: passage counts and token-length statistics per split.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lmtune.artifacts import atomic_dir, write_json
from lmtune.data import SPLITS, DataError, load_corpus, split
from lmtune.modeling import load_tokenizer
from lmtune.runner import run_stage


def run(cfg) -> dict:
    d = cfg.data
    rows = load_corpus(d)
    splits = split(rows, cfg.seed, d.validation_fraction, d.test_fraction, d.max_passages)
    tokenizer = load_tokenizer(cfg.paths.base)
    metrics = {"corpus": d.name, "passages": len(rows)}
    with atomic_dir(cfg.paths.processed) as out:
        for name in SPLITS:
            frame = pd.DataFrame(splits[name])
            lengths = np.array([len(ids) for ids in tokenizer(frame["text"].tolist())["input_ids"]])
            frame["tokens"] = lengths
            frame.to_parquet(out / f"{name}.parquet", index=False)
            metrics[name] = {
                "passages": len(frame),
                "tokens": int(lengths.sum()),
                "tokens_mean": float(lengths.mean()),
                "tokens_p50": float(np.percentile(lengths, 50)),
                "tokens_p95": float(np.percentile(lengths, 95)),
                "tokens_max": int(lengths.max()),
                "truncated_share": float((lengths >= d.max_length).mean()),
            }
        if metrics["train"]["truncated_share"] == 1.0:
            raise DataError(
                f"every training passage is longer than data.max_length={d.max_length} tokens; "
                "raise data.max_length or lower data.passage_chars"
            )
    write_json(Path(cfg.paths.metrics) / "prepare.json", metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(run))
