"""What each side of `make bench` reports, measured the same way for both."""

import contextlib
import json
import sys
import time

from lmtune.train.engine import peak_memory_gib


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This device's dense bf16 matrix-multiply rate (the GPU's if there is one, else the CPU's):
    the ceiling a training step is measured against, taken in the same run as the step."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(size, size, dtype=torch.bfloat16, device=dev) for _ in range(2))
    for _ in range(3):  # first calls pick kernels and warm clocks
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - began) / 1e9


def write_side(out: str, side: str, steps: int, useful_tokens: int, seconds: float, val_loss: float) -> dict:
    result = {
        "side": side,
        "steps": steps,
        "useful_tokens": useful_tokens,
        "seconds": seconds,
        "useful_tokens_per_second": useful_tokens / seconds,
        "step_seconds": seconds / steps,
        "peak_memory_gib": peak_memory_gib(),
        "val_loss": val_loss,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2), file=sys.stderr)
    return result


def micro_batch_rate(overrides: list[str], autocast: bool, steps: int, join: int = 1) -> tuple[float, float]:
    """(seconds, useful tokens/s) of one forward + backward per lmtune micro-batch on the configured
    model; the first micro-batch pays one-off costs (allocations, kernel selection) and is not timed.
    `join` > 1 makes longer sequences: that many consecutive passages, cut at data.max_length."""
    import torch
    from omegaconf import OmegaConf

    from lmtune.checkpoint import load_tokenizer
    from lmtune.config import load
    from lmtune.data.sequences import read_sequences
    from lmtune.model.load import load_for_training
    from lmtune.model.lora import add_lora
    from lmtune.train.step import batch_maker, micro_batch_loss, prepare_model

    cfg = load(overrides)
    tokenizer = load_tokenizer(cfg.paths.base)
    seqs = read_sequences(cfg.paths.processed, "train")
    if join > 1:
        seqs = [sum(seqs[i : i + join], [])[: cfg.data.max_length] for i in range(0, len(seqs), join)]
    model = add_lora(
        load_for_training(cfg.paths.base, cfg.quant, cfg.train.gradient_checkpointing), cfg.lora, 0
    )
    model.train()
    prepare_model(model, cfg.train)
    next_batch = batch_maker(seqs, OmegaConf.merge(cfg, {"seed": 0}), tokenizer.pad_token_id)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    tokens, began = 0, 0.0
    for index in range(steps + 1):
        if index == 1:
            began = time.perf_counter()
        batch, useful = next_batch(index)
        with context():
            micro_batch_loss(model, batch, cfg.train).backward()
        model.zero_grad(set_to_none=True)
        tokens += useful if index else 0
    seconds = time.perf_counter() - began
    return seconds / steps, tokens / seconds
