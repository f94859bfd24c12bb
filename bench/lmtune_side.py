"""lmtune's finetune loop on the same budget as bench/baseline.py (one side of `make bench`).

python bench/lmtune_side.py --steps 10 --out /tmp/lmtune.json [key=value ...]
python bench/lmtune_side.py --tokens 12000 --out /tmp/lmtune.json   # as many steps as that budget needs
"""

import argparse
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from report import write_side

from lmtune.checkpoint import load_tokenizer
from lmtune.config import load
from lmtune.data.sequences import read_sequences
from lmtune.model.load import load_for_training
from lmtune.model.lora import add_lora
from lmtune.train.loop import train
from lmtune.train.step import batch_maker


def steps_for_budget(train_seqs, cfg, pad_id: int, tokens: int) -> int:
    """The fewest optimizer steps whose micro-batches hold at least `tokens` useful tokens."""
    next_batch, seen, steps = batch_maker(train_seqs, cfg, pad_id), 0, 0
    while seen < tokens:
        seen += sum(next_batch(steps * cfg.train.grad_accum + m)[1] for m in range(cfg.train.grad_accum))
        steps += 1
    return steps


def train_lmtune(model_path, cfg, train_seqs, val_seqs, pad_id: int, on_step=None, patch=None) -> dict:
    """train()'s result for a fresh LoRA on the base at `model_path`, with no mid-run validation
    or checkpoints (the baseline does neither); its time is the optimizer steps' (`train_seconds`),
    without the validation after the last step, which the baseline's timed trainer.train() lacks.
    `patch(model)` changes the model before training (a kernel library under test)."""
    cfg = OmegaConf.merge(cfg, {"train": {"eval_every": 10**6, "checkpoint_every": 10**6}})
    tc = cfg.train
    base = load_for_training(
        model_path,
        cfg.quant,
        tc.gradient_checkpointing,
        False,
        tc.recompute_every_n_layers,
        tc.offload_activations,
    )
    model = add_lora(base, cfg.lora, cfg.seed)
    if patch:
        patch(model)
    with tempfile.TemporaryDirectory() as checkpoints:
        return train(model, train_seqs, val_seqs, cfg, Path(checkpoints), pad_id, on_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int)
    budget.add_argument("--tokens", type=int, help="train on at least this many useful tokens")
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args()
    cfg = load(overrides)
    tokenizer = load_tokenizer(cfg.paths.base)
    train_seqs = read_sequences(cfg.paths.processed, "train")
    steps = args.steps or steps_for_budget(train_seqs, cfg, tokenizer.pad_token_id, args.tokens)
    cfg = OmegaConf.merge(cfg, {"train": {"max_steps": steps}})
    val_seqs = read_sequences(cfg.paths.processed, "validation")
    result = train_lmtune(cfg.paths.base, cfg, train_seqs, val_seqs, tokenizer.pad_token_id)
    side = (
        f"lmtune (packing={cfg.train.packing}, checkpointing={cfg.train.gradient_checkpointing}, "
        f"{cfg.quant.bits}-bit)"
    )
    write_side(
        args.out, side, steps, result["train_tokens"], result["train_seconds"], result["final_val_loss"]
    )


if __name__ == "__main__":
    main()
