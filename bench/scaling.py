"""How training time grows on this machine: useful tokens/s against sequence length (same token
slots per step), and data preparation time (tokenize + pack) against dataset size.

    python bench/scaling.py --steps 3     # about 4 minutes on 2 cores; prints two Markdown tables
"""

import argparse
import time

from report import micro_batch_rate

from lmtune.config import load
from lmtune.data import pack, read_split, tokenize
from lmtune.modeling import load_tokenizer

TOKENS_PER_STEP = 2048


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    lines = [
        f"| max_length (rows of 2x) | useful tokens/s ({TOKENS_PER_STEP} token slots per step) |",
        "|---|---|",
    ]
    for max_length in (128, 256, 512):
        # packed rows of 2 x max_length, as many as hold TOKENS_PER_STEP slots
        overrides = [f"data.max_length={max_length}", f"train.pack_length={2 * max_length}",
                     f"train.batch_size={TOKENS_PER_STEP // max_length}"]  # fmt: skip
        lines.append(f"| {max_length} | {micro_batch_rate(overrides, True, args.steps)[1]:.0f} |")
        print(lines[-1], flush=True)

    cfg = load()
    tokenizer = load_tokenizer(cfg.paths.base)
    texts = read_split(cfg.paths.processed, "train")
    lines += ["", "| training passages | tokenize + pack s | tokens |", "|---|---|---|"]
    for n in (len(texts) // 8, len(texts) // 2, len(texts)):
        began = time.perf_counter()
        seqs = tokenize(texts[:n], tokenizer, cfg.data.max_length)
        pack(seqs, cfg.train.pack_length)
        lines.append(f"| {n} | {time.perf_counter() - began:.2f} | {sum(map(len, seqs))} |")
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    main()
