"""Each training lever on its own: forward + backward time per micro-batch on the default model,
adding one lever at a time (one warm-up step, then --steps timed steps per variant).

    python bench/levers.py --steps 3      # about 5 minutes on 2 cores; prints a Markdown table
"""

import argparse
import resource

from report import micro_batch_rate

# (name, overrides, bf16 autocast): cumulative, in the order they were added to lmtune
VARIANTS = [
    (
        "padded batches, fp32 adapters, LoRA dropout 0.05",
        ["train.packing=false", "lora.lora_dropout=0.05", "train.chunked_loss=false"],
        False,
    ),
    ("+ LoRA dropout 0", ["train.packing=false", "train.chunked_loss=false"], False),
    ("+ bf16 autocast for the adapters", ["train.packing=false", "train.chunked_loss=false"], True),
    (
        "+ packing, rows of 256",
        ["train.pack_length=256", "train.attention=sdpa", "train.chunked_loss=false"],
        True,
    ),
    ("+ packing, rows of 512", ["train.attention=sdpa", "train.chunked_loss=false"], True),
    ("+ per-passage (varlen) attention", ["train.chunked_loss=false"], True),
    ("+ chunked head and loss (lmtune's default)", [], True),
    ("same + gradient checkpointing", ["train.gradient_checkpointing=true"], True),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    lines = ["| variant | s per micro-batch | useful tokens/s |", "|---|---|---|"]
    for name, overrides, autocast in VARIANTS:
        step, rate = micro_batch_rate(overrides, autocast, args.steps)
        lines.append(f"| {name} | {step:.1f} | {rate:.0f} |")
        print(lines[-1], flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("\n".join(["", *lines, "", f"(process peak RSS over all variants: {peak:.1f} GiB)"]))


if __name__ == "__main__":
    main()
