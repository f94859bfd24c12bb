"""Where a training step's time goes: one lmtune micro-batch (forward and backward) and the
optimizer step, under torch.profiler, on the default model or on a 1-2B shape with random weights.
Op time is summed by kind (NF4 dequantization, the base's matmuls, LoRA's, attention, everything
else torch runs) and the rest of the wall time is Python and framework overhead.

    python bench/profile_step.py                          # the configured model (SmolLM2-135M)
    python bench/profile_step.py --shape smollm2_1.7b     # its 1.7B sibling's shape, random weights
    python bench/profile_step.py --shape smollm2_1.7b --batch-size 4 --out /tmp/profile.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from report import matmul_gflops
from shapes import SHAPES, shaped_base

from lmtune.checkpoint import load_tokenizer
from lmtune.config import load
from lmtune.data.sequences import read_sequences
from lmtune.model.load import load_for_training
from lmtune.model.lora import add_lora
from lmtune.train.engine import precision
from lmtune.train.step import batch_maker, micro_batch_loss, prepare_model

KINDS = (
    "NF4 dequantization",
    "base matmuls",
    "LoRA matmuls",
    "attention",
    "dtype casts and copies",
    "other torch ops (norms, activations, rotary, loss)",
    "optimizer (AdamW over the LoRA parameters)",
    "Python and framework overhead",
)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")
# lmtune's per-passage attention on a CPU is eager: batched matmuls, a masked softmax
ATTENTION_OPS = (
    "aten::bmm",
    "aten::baddbmm",
    "aten::_softmax",
    "aten::_softmax_backward_data",
    "aten::masked_fill_",
)
CAST_OPS = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")


def kind_of(name: str, shapes: list, rank: int) -> str:
    """The kind of a profiled op, from its name and (for matmuls) its input shapes: a LoRA matmul
    has the adapter's rank as one of its dimensions."""
    if "dequantize" in name or "bitsandbytes" in name:
        return KINDS[0]
    if name in MATMUL_OPS:
        dims = {d for shape in shapes for d in (shape or [])}
        return KINDS[2] if rank in dims else KINDS[1]
    if name in ATTENTION_OPS or "attention" in name:
        return KINDS[3]
    if name in CAST_OPS:
        return KINDS[4]
    return KINDS[5]


def profile(cfg, steps: int) -> dict:
    """Seconds per micro-batch by kind, averaged over `steps` after one untimed warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    tokenizer = load_tokenizer(cfg.paths.base)
    seqs = read_sequences(cfg.paths.processed, "train")
    tc = cfg.train
    model = add_lora(load_for_training(cfg.paths.base, cfg.quant, tc.gradient_checkpointing), cfg.lora, 0)
    model.train()
    prepare_model(model, tc)
    autocast, _ = precision(cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=tc.lr)
    next_batch = batch_maker(seqs, OmegaConf.merge(cfg, {"seed": 0}), tokenizer.pad_token_id)

    def step(index: int) -> tuple[int, float]:
        batch, useful = next_batch(index)
        with autocast:
            micro_batch_loss(model, batch, tc).backward()
        began = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return useful, time.perf_counter() - began

    step(0)  # allocations, kernel choice
    seconds = dict.fromkeys(KINDS, 0.0)
    with profiler(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        began = time.perf_counter()
        useful = 0
        for index in range(1, steps + 1):
            tokens, optimizer_seconds = step(index)
            useful += tokens
            seconds[KINDS[6]] += optimizer_seconds
        wall = time.perf_counter() - began
    in_ops = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("Optimizer.step") or event.key.startswith("ProfilerStep"):
            continue
        self_seconds = event.self_cpu_time_total / 1e6
        in_ops += self_seconds
        seconds[kind_of(event.key, event.input_shapes, cfg.lora.r)] += self_seconds
    seconds[KINDS[5]] -= seconds[KINDS[6]]  # the optimizer's own ops were counted as other ops
    seconds[KINDS[5]] = max(seconds[KINDS[5]], 0.0)
    seconds[KINDS[7]] = max(wall - in_ops, 0.0)
    return {
        "steps": steps,
        "wall_seconds_per_step": wall / steps,
        "useful_tokens_per_second": useful / wall,
        "seconds_per_step": {k: v / steps for k, v in seconds.items()},
        "share": {k: v / wall for k, v in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=["configured", *SHAPES], default="configured")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="passages per micro-batch")
    parser.add_argument("--out", default=None)
    args, overrides = parser.parse_known_args()
    cfg = load(overrides)
    if args.shape != "configured":
        OmegaConf.update(cfg, "paths.base", str(shaped_base(args.shape, cfg.paths.base)))
    if args.batch_size:
        OmegaConf.update(cfg, "train.batch_size", args.batch_size)
    result = profile(cfg, args.steps)
    parameters = json.loads((Path(cfg.paths.base) / "config.json").read_text())
    peak = matmul_gflops()
    result |= {
        "shape": args.shape,
        "hidden_size": parameters["hidden_size"],
        "num_hidden_layers": parameters["num_hidden_layers"],
        "matmul_bf16_gflops": peak,
        "threads": torch.get_num_threads(),
    }
    lines = [
        f"{args.shape}: {result['wall_seconds_per_step']:.2f} s per micro-batch and optimizer step, "
        f"{result['useful_tokens_per_second']:.0f} useful tokens/s; bf16 matmul {peak:.0f} GFLOP/s",
        "",
        "| where the time goes | s per step | share |",
        "|---|---|---|",
        *[f"| {k} | {result['seconds_per_step'][k]:.2f} | {result['share'][k]:.0%} |" for k in KINDS],
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
