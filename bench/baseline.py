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
    TrainerCallback,
    TrainingArguments,
)

from lmtune.checkpoint import load_tokenizer
from lmtune.config import load
from lmtune.data.sequences import read_sequences
from lmtune.model.hardware import resolve_dtype
from lmtune.train.loop import validation_loss


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
        ),
    )


class StepTimer(TrainerCallback):
    """Each optimizer step's seconds and useful (non-padding) tokens, as lmtune's loop records
    them. Tokens are counted where the model reads its batch, kept on the device until the end (no
    extra host sync inside a step). Not in the collator: the data loader collates one batch ahead,
    which a count there would add to the tokens trained on."""

    def __init__(self, model):
        self.counts, self.steps, self.began = [], [], 0.0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if module.training:
            self.counts.append(kwargs["attention_mask"].sum())

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.began, self.first = time.perf_counter(), len(self.counts)

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append(
            {
                "step": state.global_step,
                "seconds": time.perf_counter() - self.began,
                "tokens": self.counts[self.first :],
            }
        )

    def step_times(self) -> list[dict]:
        return [{**s, "tokens": int(sum(t.item() for t in s["tokens"]))} for s in self.steps]


def train_usual(
    model, tokenizer, train_seqs, train, steps: int, seed: int, dtype: torch.dtype
) -> tuple[int, float, list[dict]]:
    """HF Trainer over padded batches for `steps` steps: (useful tokens, seconds, per-step times)."""
    timer = StepTimer(model)
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
            # plain ints: read_sequences' ids are numpy integers, which the tokenizer's pad refuses
            train_dataset=[{"input_ids": [int(t) for t in s]} for s in train_seqs],
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[timer],
        )
        began = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - began
    steps = timer.step_times()
    return sum(s["tokens"] for s in steps), seconds, steps


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
    useful, seconds, _ = train_usual(model, tokenizer, train_seqs, cfg.train, args.steps, cfg.seed, dtype)
    val = validation_loss(
        model, val_seqs, cfg.train.batch_size, cfg.train.eval_batches, tokenizer.pad_token_id
    )
    write_side(
        args.out, "baseline (HF Trainer + NF4 + checkpointing + padding)", args.steps, useful, seconds, val
    )


if __name__ == "__main__":
    main()
