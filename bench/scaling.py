"""How training time grows on this machine: useful tokens/s against sequence length (same token
slots per step), and data preparation time (tokenize + pack) against dataset size.

    python bench/scaling.py --steps 3     # about 4 minutes on 2 cores; prints two Markdown tables
"""

import argparse
import time

import torch
from omegaconf import OmegaConf

from lmtune.config import load
from lmtune.data import pack, read_split, tokenize
from lmtune.modeling import add_lora, load_for_training, load_tokenizer
from lmtune.training import batch_maker

TOKENS_PER_STEP = 2048


def tokens_per_second(max_length: int, steps: int) -> float:
    """Packed rows of 2 x max_length, as many as hold TOKENS_PER_STEP slots; one untimed warm-up step."""
    cfg = load([f"data.max_length={max_length}", f"train.pack_length={2 * max_length}",
                f"train.batch_size={TOKENS_PER_STEP // max_length}"])  # fmt: skip
    tokenizer = load_tokenizer(cfg.paths.base)
    seqs = tokenize(read_split(cfg.paths.processed, "train"), tokenizer, max_length)
    model = add_lora(load_for_training(cfg.paths.base, cfg.quant, False), cfg.lora, 0)
    model.train()
    next_batch = batch_maker(seqs, OmegaConf.merge(cfg, {"seed": 0}), tokenizer.pad_token_id)
    tokens, began = 0, 0.0
    for index in range(steps + 1):
        if index == 1:
            began = time.perf_counter()
        batch, useful = next_batch(index)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        tokens += useful if index else 0
    return tokens / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    lines = [
        f"| max_length (rows of 2x) | useful tokens/s ({TOKENS_PER_STEP} token slots per step) |",
        "|---|---|",
    ]
    for max_length in (128, 256, 512):
        lines.append(f"| {max_length} | {tokens_per_second(max_length, args.steps):.0f} |")
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
