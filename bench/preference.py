"""`make bench`'s preference side: trl's DPOTrainer with peft, the usual recipe, against lmtune's
align loop, on the same quantized base, the same pairs, LoRA config, batch and number of optimizer
steps, each side in its own process (its peak memory its own). Both start a fresh adapter on the
base (align.start=base), so both references are the base itself: lmtune's is scored once beforehand
(the `reference` stage's work, timed apart), trl's is computed at every step.

    python bench/preference.py --side lmtune --steps 8 --out /tmp/lmtune.json [key=value ...]
    python bench/preference.py --side trl --steps 8 --out /tmp/trl.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmtune.align.loop import score_pairs, start_policy, train_preferences
from lmtune.align.pairs import pair_sequences
from lmtune.align.sources import chatterbot_splits
from lmtune.checkpoint import load_tokenizer
from lmtune.config import load
from lmtune.model.hardware import resolve_dtype
from lmtune.train.engine import peak_memory_gib, precision

PAIRS = 96  # the first pairs of the shipped set (seeded order); steps x batch of them are trained on


def lmtune_side(cfg, pairs, seqs, tokenizer) -> dict:
    model, packed = start_policy(cfg, trainable=True)
    began = time.perf_counter()
    with model.disable_adapter():
        reference = score_pairs(model, seqs, tokenizer.pad_token_id, packed, "reference", precision(cfg)[0])
    reference_seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as checkpoints:
        result = train_preferences(
            model, seqs, reference, cfg, packed, Path(checkpoints), tokenizer.pad_token_id
        )
    return {
        "useful_tokens": result["train_tokens"],
        "train_seconds": result["train_seconds"],
        "reference_seconds": reference_seconds,
        "final_reward_accuracy": result["final"]["rewards/accuracies"],
        "final_loss": result["final"]["loss"],
        "packed": packed,
    }


def trl_side(cfg, pairs, seqs, tokenizer) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lmtune.model.load import load_for_training

    a = cfg.align
    base = load_for_training(cfg.paths.base, cfg.quant, gradient_checkpointing=False)
    lora = cfg.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
    )
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    compute = resolve_dtype(cfg.quant.bnb_4bit_compute_dtype)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        beta=a.beta,
        loss_type=["sigmoid"],
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=a.warmup_steps,
        max_grad_norm=a.max_grad_norm,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        max_steps=a.max_steps,
        max_length=cfg.data.max_length,
        bf16=compute == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=cfg.seed,
        dataloader_drop_last=True,
    )
    logged, step_seconds = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.began = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_seconds.append(time.perf_counter() - self.began)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "rewards/accuracies" in logs:
                logged.append(logs)

    trainer = DPOTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    return {
        "useful_tokens": int(trainer._total_train_tokens),
        "train_seconds": sum(step_seconds),
        "reference_seconds": 0.0,  # inside every step
        "final_reward_accuracy": logged[-1]["rewards/accuracies"],
        "final_loss": logged[-1]["loss"],
        "packed": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=("lmtune", "trl"), required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args()
    cfg = load(overrides)
    # DPO on a fresh adapter, as both sides run it; set directly (the align group would also switch
    # the pipeline's stages, which a benchmark does not run)
    OmegaConf.update(cfg, "align.method", "dpo")
    OmegaConf.update(cfg, "align.start", "base")
    OmegaConf.update(cfg, "align.max_steps", args.steps)
    tokenizer = load_tokenizer(cfg.paths.base)
    pairs, seqs = pair_sequences(
        chatterbot_splits(cfg.seed, 0.1)["train"][:PAIRS], tokenizer, cfg.data.max_length, drop_long=True
    )
    result = (lmtune_side if args.side == "lmtune" else trl_side)(cfg, pairs, seqs, tokenizer)
    result |= {
        "side": args.side,
        "steps": args.steps,
        "pairs_per_step": cfg.align.batch_size * cfg.align.grad_accum,
        "useful_tokens_per_second": result["useful_tokens"] / result["train_seconds"],
        "peak_memory_gib": peak_memory_gib(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
