"""The GRPO family's losses, as trl's GRPOTrainer computes them (loss_type and
importance_sampling_level by trl's names; tests hold the two equal, loss and every LoRA gradient):

- advantages: each completion's reward minus its group's mean (the num_generations completions of
  one prompt), divided by the group's standard deviation (scale_rewards=group), the whole batch's
  (batch) or nothing (none: Dr. GRPO);
- the importance ratio of the policy to the one that sampled, per token, or per sequence (GSPO: the
  exponentiated mean log-ratio of the completion), clipped to [1 - epsilon, 1 + epsilon_high]
  (DAPO's clip-higher when epsilon_high > epsilon), the pessimistic one of clipped and unclipped
  times the advantage;
- with beta > 0, the k3 estimate of the KL divergence to the starting policy, weighted by the
  importance ratio (trl's use_bias_correction_kl), times beta;
- averaged over tokens: per sequence then over sequences (grpo), over every token of the batch
  (bnpo), over sequences x max_completion_length (dr_grpo), or over the completion tokens of the
  whole rollout batch (dapo, the default), so accumulated micro-batches add up to the batch's loss.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


def advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """Group-relative advantages of a rollout batch's rewards (prompt-major: each prompt's
    num_generations completions one after the other)."""
    grouped = rewards.view(-1, num_generations)
    centred = rewards - grouped.mean(1).repeat_interleave(num_generations)
    if scale_rewards == "none":
        return centred
    std = grouped.std(1).repeat_interleave(num_generations) if scale_rewards == "group" else rewards.std()
    return centred / (std + 1e-4)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantage: torch.Tensor,
    mask: torch.Tensor,
    rl,
    batch_tokens: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch of completions and its statistics. logps, old_logps, ref_logps,
    mask: [completions, tokens] (mask 1 on a completion's learned tokens); advantage: [completions];
    `rl` the config section (loss_type, importance_sampling_level, epsilon, epsilon_high, beta,
    max_completion_length); `batch_tokens`: learned tokens of the whole rollout batch (dapo). Without
    old_logps (one update per rollout batch) the ratio is 1, its gradient that of the log-probability."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if rl.importance_sampling_level == "sequence":  # GSPO: one ratio per completion
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
    clipped = torch.clamp(ratio, 1 - rl.epsilon, 1 + high)
    a = advantage.unsqueeze(1)
    per_token = -torch.min(ratio * a, clipped * a)
    stats = {}
    if rl.beta != 0.0:
        delta = ref_logps - logps
        kl = (torch.exp(delta) - delta - 1) * ratio
        per_token = per_token + rl.beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask)
    loss = _aggregate(per_token, mask, rl.loss_type, rl.max_completion_length, batch_tokens)
    low_clip = ((ratio < 1 - rl.epsilon) & (a < 0)).expand_as(mask).to(mask.dtype)
    high_clip = ((ratio > 1 + high) & (a > 0)).expand_as(mask).to(mask.dtype)
    stats["clip_ratio/low_mean"] = _masked_mean(low_clip, mask)
    stats["clip_ratio/high_mean"] = _masked_mean(high_clip, mask)
    stats["clip_ratio/region_mean"] = _masked_mean(low_clip + high_clip, mask)
    return loss, stats


def _aggregate(
    per_token, mask, loss_type: str, max_completion_length: int, batch_tokens: int
) -> torch.Tensor:
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total / (per_token.size(0) * max_completion_length)
    return total / max(batch_tokens, 1)  # dapo


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
