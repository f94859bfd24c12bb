"""How training time grows on this machine: useful tokens/s against sequence length (about the
same number of tokens per step), and data preparation time (tokenizing) against dataset size.

    python bench/scaling.py --steps 3     # about 4 minutes on 2 cores; prints two Markdown tables
"""

import argparse
import math
import time
from pathlib import Path

import pandas as pd
from report import micro_batch_rate

from lmtune.checkpoint import load_tokenizer
from lmtune.config import load
from lmtune.data.sequences import tokenize

TOKENS_PER_STEP = 2048
PASSAGE_TOKENS = 156  # the default data's mean passage length


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    lines = ["| sequence length | sequences per step | useful tokens/s |", "|---|---|---|"]
    for length in (128, 256, 512, 1024):
        # sequences of `length` tokens: consecutive passages joined, then cut
        join = math.ceil(length / PASSAGE_TOKENS) + 1
        per_step = TOKENS_PER_STEP // length
        overrides = [
            f"data.max_length={length}",
            f"train.batch_size={per_step}",
            f"train.pack_length={max(512, length)}",
        ]
        rate = micro_batch_rate(overrides, True, args.steps, join=join)[1]
        lines.append(f"| {length} | {per_step} | {rate:.0f} |")
        print(lines[-1], flush=True)

    cfg = load()
    tokenizer = load_tokenizer(cfg.paths.base)
    texts = pd.read_parquet(Path(cfg.paths.processed) / "train.parquet")[
        "text"
    ].tolist()  # as prepare wrote it
    lines += ["", "| training passages | tokenize s | tokens |", "|---|---|---|"]
    for n in (len(texts) // 8, len(texts) // 2, len(texts)):
        began = time.perf_counter()
        seqs = tokenize(texts[:n], tokenizer, cfg.data.max_length)
        lines.append(f"| {n} | {time.perf_counter() - began:.2f} | {sum(map(len, seqs))} |")
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    main()
