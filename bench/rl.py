"""`make bench`'s RL side: trl's GRPOTrainer with peft, the usual recipe, against lmtune's RL loop,
on the same quantized base, task, prompts, rewards, group size, completion length, loss variant,
learning rate and number of steps, each side in its own process (its peak memory its own). Both
start a fresh adapter on the base (rl.start=base) and generate with transformers (no vLLM).

The figure compared is completion tokens per second end to end: every completion token sampled,
divided by the wall time of the whole run (generation, scoring, training). The reward of the last
steps is printed beside it, to show both sides learn the same thing.

    python bench/rl.py --side lmtune --steps 8 --out /tmp/lmtune.json [key=value ...]
    python bench/rl.py --side trl --steps 8 --out /tmp/trl.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from lmtune.checkpoint import load_tokenizer
from lmtune.config import load
from lmtune.model.hardware import resolve_dtype
from lmtune.rl.rewards import reward_functions, score
from lmtune.rl.tasks import load_task, prompt_ids
from lmtune.train.engine import peak_memory_gib

# experiment=rl's task and sampling: one-digit sums, the answer read as the last number written
TASK = {
    "rl.task": "chain_sum",
    "rl.task_config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "rl.train_prompts": 120,
    "rl.test_prompts": 20,
    "rl.system_prompt": "Reply with only the number.",
    "rl.answer": "last_number",
    "rl.rewards": {"task": 1.0},
    "rl.max_completion_length": 24,
    "rl.lr": 1.0e-4,
    "rl.start": "base",
    "rl.method": "grpo",
}
LAST = 3  # the reward reported: the mean over the last steps' rollout batches


def lmtune_side(cfg, rows, prompts, functions, tokenizer) -> dict:
    from lmtune.rl.loop import start_policy, train_rl

    model, packed, as_started = start_policy(cfg)
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        train_rl(
            model, rows, prompts, functions, cfg, tokenizer, packed,
            Path(folder) / "rollouts", Path(folder) / "checkpoints", reference=as_started,
        )  # fmt: skip
        seconds = time.perf_counter() - began
        batches = [pd.read_parquet(f) for f in sorted((Path(folder) / "rollouts").glob("rollout_*.parquet"))]
    return {
        "completions_sampled": int(sum(len(b) for b in batches)),
        "completion_tokens": int(sum(b["completion_ids"].map(len).sum() for b in batches)),
        "seconds": seconds,
        "generation_seconds": float(sum(b["generation_seconds"].iloc[0] for b in batches)),
        "rewards": [float(b["reward"].mean()) for b in batches],
        "packed": packed,
    }


def trl_side(cfg, rows, prompts, functions, tokenizer) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from lmtune.model.load import load_for_training

    rl, lora = cfg.rl, cfg.lora
    base = load_for_training(cfg.paths.base, cfg.quant, gradient_checkpointing=False)
    # the same prompt text lmtune asks (system prompt, chat template, generation prompt)
    dataset = Dataset.from_list([{"prompt": tokenizer.decode(p), "row": i} for i, p in enumerate(prompts)])
    completion_tokens = []

    def reward(prompts, completions, completion_ids, row, **_) -> list[float]:
        completion_tokens.extend(len(c) for c in completion_ids)
        picked = [rows[i] for i in row]
        return score(functions, [r["question"] for r in picked], completions, picked)["reward"]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        num_generations=rl.num_generations,
        # trl generates per_device_train_batch_size x gradient_accumulation_steps completions a step
        per_device_train_batch_size=rl.batch_size * rl.num_generations // rl.grad_accum,
        gradient_accumulation_steps=rl.grad_accum,
        max_completion_length=rl.max_completion_length,
        temperature=rl.temperature,
        top_p=rl.top_p,
        loss_type=rl.loss_type,
        beta=rl.beta,
        epsilon=rl.epsilon,
        epsilon_high=rl.epsilon_high if rl.epsilon_high is not None else rl.epsilon,
        importance_sampling_level=rl.importance_sampling_level,
        mask_truncated_completions=rl.mask_truncated_completions,
        scale_rewards=rl.scale_rewards,
        num_iterations=rl.num_iterations,
        learning_rate=rl.lr,
        lr_scheduler_type="cosine",
        warmup_steps=rl.warmup_steps,
        max_grad_norm=rl.max_grad_norm,
        max_steps=rl.max_steps,
        gradient_checkpointing=False,  # as lmtune's RL runs: the faster setting for this model
        bf16=resolve_dtype(cfg.quant.bnb_4bit_compute_dtype) == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=cfg.seed,
    )
    trainer = GRPOTrainer(
        model=base,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=lora.target_modules,
        ),  # fmt: skip
    )
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    logged = [log for log in trainer.state.log_history if "reward" in log]
    return {
        "completions_sampled": len(completion_tokens),
        "completion_tokens": int(sum(completion_tokens)),
        "seconds": seconds,
        "generation_seconds": None,  # inside trl's step
        "rewards": [float(log["reward"]) for log in logged],
        "packed": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=("lmtune", "trl"), required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args()
    cfg = load(overrides)
    # set directly (the rl group would also switch the pipeline's stages, which a benchmark does not run)
    for key, value in {**TASK, "rl.max_steps": args.steps}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    task, rows, _ = load_task(cfg.rl, cfg.seed)
    tokenizer = load_tokenizer(cfg.paths.base)
    prompts = [prompt_ids(r["question"], cfg.rl, tokenizer) for r in rows]
    functions = reward_functions(cfg.rl.rewards, task, cfg.rl.answer)
    result = (lmtune_side if args.side == "lmtune" else trl_side)(cfg, rows, prompts, functions, tokenizer)
    result |= {
        "side": args.side,
        "steps": args.steps,
        "completions_per_step": cfg.rl.batch_size * cfg.rl.num_generations,
        "completion_tokens_per_second": result["completion_tokens"] / result["seconds"],
        "reward_last_steps": sum(result["rewards"][-LAST:]) / len(result["rewards"][-LAST:]),
        "peak_memory_gib": peak_memory_gib(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
