"""lmtune's finetune loop on the same budget as bench/baseline.py (one side of `make bench`).

python bench/lmtune_side.py --steps 10 --out /tmp/lmtune.json [key=value ...]
"""

import argparse
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf
from report import write_side

from lmtune.config import load
from lmtune.data import read_split, tokenize
from lmtune.modeling import add_lora, load_for_training, load_tokenizer
from lmtune.training import train, validation_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args()
    cfg = load(overrides)
    # no mid-run validation or checkpoints: the baseline does neither
    cfg = OmegaConf.merge(
        cfg, {"train": {"max_steps": args.steps, "eval_every": 10**6, "checkpoint_every": 10**6}}
    )
    tokenizer = load_tokenizer(cfg.paths.base)
    train_seqs = tokenize(read_split(cfg.paths.processed, "train"), tokenizer, cfg.data.max_length)
    val_seqs = tokenize(read_split(cfg.paths.processed, "validation"), tokenizer, cfg.data.max_length)
    model = add_lora(
        load_for_training(cfg.paths.base, cfg.quant, cfg.train.gradient_checkpointing), cfg.lora, cfg.seed
    )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as checkpoints:
        result = train(model, train_seqs, val_seqs, cfg, Path(checkpoints), tokenizer.pad_token_id)
    seconds = time.perf_counter() - began
    val = validation_loss(
        model, val_seqs, cfg.train.batch_size, cfg.train.eval_batches, tokenizer.pad_token_id
    )
    side = (f"lmtune (packing={cfg.train.packing}, checkpointing={cfg.train.gradient_checkpointing}, "
            f"{cfg.quant.bits}-bit)")  # fmt: skip
    write_side(args.out, side, args.steps, result["train_tokens"], seconds, val)


if __name__ == "__main__":
    main()
