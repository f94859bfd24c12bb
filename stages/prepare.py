"""Data source → clean rows → seeded train/validation/test split → token sequences → data/processed.

    python stages/prepare.py [key=value ...]     # e.g. data=chatterbot_qa, data.max_length=512

Plain text becomes windows of data.max_length tokens (nothing is cut off); a conversation is
rendered by the model's chat template, and only its assistant turns carry loss. Each split is a
Parquet file: the token ids, their loss mask, the text as read, and for conversations the question
and reference answer that evaluate and sample use. metrics/prepare.json counts rows, windows and
tokens per split, and what was dropped and why.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from lmtune.artifacts import atomic_dir, write_json
from lmtune.checkpoint import load_tokenizer
from lmtune.config import MIN_EVAL_EXAMPLES
from lmtune.data import DataError
from lmtune.data.sequences import (
    SPLITS,
    chat_prompt,
    chat_sequence,
    require_tool_support,
    split,
    text_windows,
)
from lmtune.data.sources import load_rows
from lmtune.pipeline.runner import run_stage


def sequences(rows: list[dict], tokenizer, d) -> tuple[list[dict], Counter]:
    """One record per training sequence, and the rows dropped for being too long."""
    records, dropped = [], Counter()
    for row in rows:
        if "messages" in row:
            seq = chat_sequence(row["messages"], tokenizer, row.get("tools"))
            if len(seq) > d.max_length:
                dropped["too_long"] += 1  # a conversation is not split: its answer needs its question
                continue
            prompt_ids = chat_prompt(row["messages"], tokenizer, row.get("tools"))
            answer = row["messages"][-1]
            records.append(
                {
                    "text": tokenizer.decode(seq),
                    "input_ids": list(seq),
                    "loss_mask": seq.mask,
                    "prompt": tokenizer.decode(prompt_ids),
                    "prompt_ids": prompt_ids,
                    "question": next(
                        m["content"] for m in reversed(row["messages"][:-1]) if m["role"] == "user"
                    ),
                    "reference": answer["content"] or json.dumps(answer.get("tool_calls")),
                    "source": row["source"],
                }
            )
        else:
            for window in text_windows(row["text"], tokenizer, d.max_length, d.stride or d.max_length):
                records.append(
                    {
                        "text": tokenizer.decode(window),
                        "input_ids": list(window),
                        "loss_mask": window.mask or [1] * len(window),
                        "prompt": None,
                        "prompt_ids": None,
                        "question": None,
                        "reference": None,
                        "source": row["source"],
                    }
                )
    return records, dropped


def run(cfg) -> dict:
    d = cfg.data
    tokenizer = load_tokenizer(cfg.paths.base)  # before reading: a chat template must exist first
    if d.format == "chat" and not tokenizer.chat_template:
        raise DataError(f"data.format=chat: {cfg.model.name} has no chat template; set model.chat_template")
    rows, dropped = load_rows(d)
    require_tool_support(rows, tokenizer, cfg.model.name)  # before tokenizing anything
    splits = split(rows, cfg.seed, d.validation_fraction, d.test_fraction, d.max_samples)
    metrics = {"corpus": d.name, "format": d.format, "rows": len(rows), "dropped": dict(dropped)}
    with atomic_dir(cfg.paths.processed) as out:
        for name in SPLITS:
            records, too_long = sequences(splits[name], tokenizer, d)
            metrics["dropped"] = dict(Counter(metrics["dropped"]) + too_long)
            if not records:
                raise DataError(
                    f"the {name} split is empty after tokenizing: every row is longer than "
                    f"data.max_length={d.max_length} tokens; raise it"
                )
            if name == "test" and len(records) < MIN_EVAL_EXAMPLES:
                raise DataError(
                    f"the test split holds {len(records)} examples ({len(splits[name])} of {len(rows)} rows at "
                    f"data.test_fraction={d.test_fraction}); eval's bootstrap intervals need at least "
                    f"{MIN_EVAL_EXAMPLES}: raise data.test_fraction or give more rows"
                )
            frame = pd.DataFrame(records)
            frame.to_parquet(out / f"{name}.parquet", index=False)
            lengths = frame["input_ids"].map(len).to_numpy()
            metrics[name] = {
                "rows": len(splits[name]) - sum(too_long.values()),
                "sequences": len(frame),
                "tokens": int(lengths.sum()),
                "learned_tokens": int(frame["loss_mask"].map(sum).sum()),
                "tokens_mean": float(lengths.mean()),
                "tokens_p50": float(np.percentile(lengths, 50)),
                "tokens_p95": float(np.percentile(lengths, 95)),
                "tokens_max": int(lengths.max()),
            }
    write_json(Path(cfg.paths.metrics) / "prepare.json", metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(run))
