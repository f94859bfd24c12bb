"""GRPO-family training of a LoRA adapter on the engine (lmtune.train.engine): each rollout batch
(lmtune.rl.rollouts) is trained on for rl.num_iterations optimizer steps, its completions split
over rl.grad_accum micro-batches in one packed row each; the loss is lmtune.rl.losses'. A run's
rollout batches are read back when stored, so a resumed run trains on exactly the completions
the killed one sampled, and a replay (generate=False) on those of the run it audits."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from lmtune.config import identity
from lmtune.rl.losses import grpo_loss
from lmtune.rl.rewards import task_reward
from lmtune.rl.rollouts import Rollouts, make_rollout, padded, sequences, summary
from lmtune.train import policy
from lmtune.train.engine import Method, Schedule, fit, precision
from lmtune.train.logps import token_logps


def start_policy(cfg: DictConfig):
    """The quantized base as training sees it, with the adapter RL starts from (rl.start=tuned: the
    SFT adapter, or the preference-tuned one) or a fresh LoRA (base); whether completions train in
    packed rows (the family's exact path); and a context in which the model is the starting policy
    (for the KL term's reference)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model, packed = policy.start_policy(cfg, cfg.paths.tuned if cfg.rl.start == "tuned" else None)

    @contextlib.contextmanager
    def as_started():
        if cfg.rl.start == "base":
            with model.disable_adapter():
                yield
            return
        now = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
        set_peft_model_state_dict(model, load_file(str(Path(cfg.paths.tuned) / "adapter_model.safetensors")))
        try:
            yield
        finally:
            model.load_state_dict(now, strict=False)

    return model, packed, as_started


def train_rl(
    model,
    rows: list[dict],
    prompt_ids: list[list[int]],
    functions: dict,
    cfg: DictConfig,
    tokenizer,
    packed: bool,
    rollout_dir: Path,
    checkpoint_dir: Path,
    generate: bool = True,
    reference: Callable | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train the LoRA parameters by rl.loss_type on rollout batches read from `rollout_dir` or,
    with `generate`, sampled from the policy and written there. Returns the engine's result."""
    rl = cfg.rl
    autocast, _ = precision(cfg)
    per_micro = rl.batch_size * rl.num_generations // rl.grad_accum

    def make(rollout: int):
        return make_rollout(
            model, rollout, rows, prompt_ids, functions, rl, cfg, tokenizer, packed, autocast, reference
        )

    rollouts = Rollouts(rollout_dir, generate, make)

    def micro_batch(trained, index: int, autocast) -> tuple[torch.Tensor, dict, int]:
        step, micro = divmod(index, rl.grad_accum)
        frame = rollouts.get(step // rl.num_iterations)
        part = frame.iloc[micro * per_micro : (micro + 1) * per_micro]
        learned = part["learned"].tolist()
        seqs = sequences(
            part["prompt_ids"].map(list).tolist(), part["completion_ids"].map(list).tolist(), learned
        )
        lengths = [len(c) if keep else 0 for c, keep in zip(part["completion_ids"], learned, strict=True)]
        with autocast:
            logps, _, entropy = token_logps(
                trained, seqs, tokenizer.pad_token_id, packed, rl.temperature, entropy=True
            )
        width = max(max(lengths), 1)
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        grid = torch.zeros(len(seqs), width, dtype=logps.dtype, device=logps.device)
        grid = grid.masked_scatter(mask.to(logps.device), logps)
        old = padded(part["old_logps"].map(list).tolist(), lengths) if rl.num_iterations > 1 else None
        ref = padded(part["ref_logps"].tolist(), lengths) if rl.beta != 0.0 else None
        batch_tokens = int(frame["learned"].to_numpy().dot(frame["completion_ids"].map(len).to_numpy()))
        loss, stats = grpo_loss(
            grid,
            old.to(grid.device) if old is not None else None,
            ref.to(grid.device) if ref is not None else None,
            torch.tensor(part["advantage"].to_numpy(), dtype=grid.dtype, device=grid.device),
            mask.to(grid.device),
            rl,
            batch_tokens / rl.grad_accum,  # dapo: each micro-batch's share of the batch's tokens
        )
        stats["entropy"] = entropy.float().mean() if entropy.numel() else torch.zeros(())
        stats |= {k: torch.tensor(v) for k, v in summary(frame).items()}
        return loss, stats, sum(map(len, seqs))

    def signal(step: int) -> bool:
        """Whether a step's rollout batch can teach anything: some learned completion's reward
        differs from its group's (else every advantage is 0, and so is the gradient)."""
        frame = rollouts.get(step // rl.num_iterations)
        return bool((frame["advantage"].abs() > 0)[frame["learned"]].any())

    method = Method(
        name="rl",
        gradient_expected=signal,
        micro_batch=micro_batch,
        fingerprint=fingerprint(cfg),
        hint="Try a lower rl.lr.",
        log_as={"loss": "rl_loss", "lr": "rl_lr"},
        shown={"reward": "reward"},
    )
    schedule = Schedule.of(rl, weight_decay=0.0, keep_checkpoints=2)
    return fit(model, method, schedule, cfg, checkpoint_dir, on_step)


def fingerprint(cfg: DictConfig) -> str:
    """What a checkpoint (and the rollouts sampled beside it) must match to be resumed: the config
    that shapes this training, and the adapter it starts from."""
    digest = hashlib.sha256(identity(cfg, ("seed", "model", "quant", "lora", "rl")).encode())
    start = Path(cfg.paths.tuned) / "adapter_model.safetensors"
    if cfg.rl.start == "tuned" and start.is_file():
        digest.update(start.read_bytes())
    return digest.hexdigest()[:16]


def held_out(
    model, rows: list[dict], prompt_ids: list[list[int]], task, cfg: DictConfig, tokenizer
) -> np.ndarray:
    """Each held-out question's task score of the policy's greedy answer (1 right, 0 wrong)."""
    from lmtune.evaluate.generation import greedy_continuations

    autocast, _ = precision(cfg)
    was_training = model.training
    model.eval()
    with autocast:
        answers = greedy_continuations(
            model, prompt_ids, cfg.rl.max_completion_length, tokenizer.pad_token_id, tokenizer.eos_token_id,
            16, "held-out",
        )  # fmt: skip
    model.train(was_training)
    score = task_reward(task, cfg.rl.answer)
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return np.array(
        [score(prompt=r["question"], completion=t, row=r) for r, t in zip(rows, texts, strict=True)]
    )
