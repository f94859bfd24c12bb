"""The usual QLoRA recipe, as most users would write it: HF Trainer + peft + bitsandbytes NF4
with double quantization, prepare_model_for_kbit_training (gradient checkpointing), batches padded
to their longest sample. Kept honest: same model, data, LoRA config, sequence length, batch and
steps as lmtune's side; nothing here is tuned against.

    python bench/baseline.py --steps 10 --out /tmp/baseline.json
"""

import argparse
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from report import write_side
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from lmtune.config import load
from lmtune.data import read_sequences
from lmtune.modeling import load_tokenizer, resolve_dtype
from lmtune.training import validation_loss


class CountingCollator(DataCollatorForLanguageModeling):
    """The stock collator, counting the non-padding tokens it hands to the model."""

    useful_tokens = 0

    def __call__(self, features, *args, **kwargs):
        batch = super().__call__(features, *args, **kwargs)
        CountingCollator.useful_tokens += int(batch["attention_mask"].sum())
        return batch


def load_usual(path, dtype: torch.dtype, lora) -> torch.nn.Module:
    """The base in NF4 with double quantization, prepared for k-bit training (gradient
    checkpointing), with LoRA on every linear layer."""
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),  # fmt: skip
    )


def train_usual(
    model, tokenizer, train_seqs, train, steps: int, seed: int, dtype: torch.dtype
) -> tuple[int, float]:
    """HF Trainer over padded batches for `steps` steps: (useful tokens, seconds)."""
    CountingCollator.useful_tokens = 0
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=train.batch_size,
                gradient_accumulation_steps=train.grad_accum,
                max_steps=steps,
                learning_rate=train.lr,
                lr_scheduler_type="cosine",
                warmup_steps=train.warmup_steps,
                bf16=dtype == torch.bfloat16,
                use_cpu=not torch.cuda.is_available(),
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                seed=seed,
                disable_tqdm=False,
            ),
            train_dataset=[{"input_ids": s} for s in train_seqs],
            data_collator=CountingCollator(tokenizer, mlm=False),
        )
        began = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - began
    return CountingCollator.useful_tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args()
    cfg = load(overrides)
    dtype = resolve_dtype(cfg.quant.bnb_4bit_compute_dtype)
    tokenizer = load_tokenizer(cfg.paths.base)
    train_seqs = read_sequences(cfg.paths.processed, "train")
    val_seqs = read_sequences(cfg.paths.processed, "validation")
    model = load_usual(cfg.paths.base, dtype, cfg.lora)
    useful, seconds = train_usual(model, tokenizer, train_seqs, cfg.train, args.steps, cfg.seed, dtype)
    val = validation_loss(
        model, val_seqs, cfg.train.batch_size, cfg.train.eval_batches, tokenizer.pad_token_id
    )
    write_side(args.out, "baseline (HF Trainer + NF4 + checkpointing + padding)", args.steps,
               useful, seconds, val)  # fmt: skip


if __name__ == "__main__":
    main()
