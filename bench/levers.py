"""Each training lever on its own: forward + backward time per micro-batch on the default model,
adding one lever at a time (one warm-up step, then --steps timed steps per variant).

    python bench/levers.py --steps 3      # about 5 minutes on 2 cores; prints a Markdown table
"""

import argparse
import contextlib
import resource
import time

import torch
from omegaconf import OmegaConf

from lmtune.config import load
from lmtune.data import read_split, tokenize
from lmtune.modeling import add_lora, load_for_training, load_tokenizer
from lmtune.training import batch_maker

# (name, overrides, bf16 autocast): cumulative, in the order they were added to lmtune
VARIANTS = [
    (
        "padded batches, fp32 adapters, LoRA dropout 0.05",
        ["train.packing=false", "lora.lora_dropout=0.05"],
        False,
    ),
    ("+ LoRA dropout 0", ["train.packing=false"], False),
    ("+ bf16 autocast for the adapters", ["train.packing=false"], True),
    ("+ packing, rows of 256", ["train.pack_length=256"], True),
    ("+ packing, rows of 512 (lmtune's default)", [], True),
    ("same + gradient checkpointing", ["train.gradient_checkpointing=true"], True),
]


def measure(overrides: list[str], autocast: bool, steps: int) -> tuple[float, float]:
    cfg = load(overrides)
    tokenizer = load_tokenizer(cfg.paths.base)
    seqs = tokenize(read_split(cfg.paths.processed, "train"), tokenizer, cfg.data.max_length)
    model = add_lora(
        load_for_training(cfg.paths.base, cfg.quant, cfg.train.gradient_checkpointing), cfg.lora, 0
    )
    model.train()
    next_batch = batch_maker(seqs, OmegaConf.merge(cfg, {"seed": 0}), tokenizer.pad_token_id)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    tokens, began = 0, 0.0
    for index in range(steps + 1):
        if index == 1:  # the first step pays one-off costs (allocations, kernel selection)
            began = time.perf_counter()
        batch, useful = next_batch(index)
        with context():
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        tokens += useful if index else 0
    seconds = time.perf_counter() - began
    return seconds / steps, tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    lines = ["| variant | s per micro-batch | useful tokens/s |", "|---|---|---|"]
    for name, overrides, autocast in VARIANTS:
        step, rate = measure(overrides, autocast, args.steps)
        lines.append(f"| {name} | {step:.1f} | {rate:.0f} |")
        print(lines[-1], flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("\n".join(["", *lines, "", f"(process peak RSS over all variants: {peak:.1f} GiB)"]))


if __name__ == "__main__":
    main()
