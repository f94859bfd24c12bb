"""Preference losses over per-response log-probabilities, and the statistics trl logs for them.

Every method sees, for each pair, the summed log-probability of the chosen and the rejected
response under the policy and the number of response tokens; the reference methods also see the
same sums under the reference (the starting policy, computed once and cached).

- dpo: -log σ(β·Δ), Δ = (π_c − ref_c) − (π_r − ref_r), summed log-probs; with label_smoothing ε,
  the conservative form -(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ) (cDPO). trl's DPOTrainer `sigmoid`.
- ipo: (Δ̄ − 1/(2β))², Δ̄ the same difference of log-ratios averaged per response token, as trl's
  DPOTrainer `ipo` computes it.
- simpo: -log σ(β·(π̄_c − π̄_r) − γ), π̄ averaged per token, no reference; trl's CPOTrainer
  `simpo` with cpo_alpha=0.
- orpo: NLL of the chosen responses per token − λ·log σ(log odds(π̄_c) − log odds(π̄_r)), no
  reference; trl's ORPOTrainer with beta=λ.
- kto: unpaired. Each example is a completion with a label (desirable or not) and a mismatched
  completion (another example's, under this prompt) that estimates the KL term z = max(0, mean of
  π_kl − ref_kl), held constant; a desirable completion costs w_d·(1 − σ(β·(r − z))), an
  undesirable one w_u·(1 − σ(β·(z − r))), r = π − ref, the mean over the examples (Ethayarajh et
  al. 2024); trl's KTOTrainer `kto`. The examples' two slots are `completion` and `kl`, not
  `chosen` and `rejected`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

METHODS = ("dpo", "ipo", "simpo", "orpo", "kto")
NEEDS_REFERENCE = ("dpo", "ipo", "kto")
UNPAIRED = ("kto",)


PAIRED_SLOTS, UNPAIRED_SLOTS = ("chosen", "rejected"), ("completion", "kl")


def slots(method: str) -> tuple[str, str]:
    """The two sequences of one training item: a pair's responses, or an unpaired example's
    completion and its mismatched KL completion."""
    return UNPAIRED_SLOTS if method in UNPAIRED else PAIRED_SLOTS


def preference_loss(
    method: str,
    policy: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor] | None,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the pairs and per-pair statistics (rewards, margins, accuracies, log-probs).

    `policy` and `reference` hold `chosen`/`rejected` (summed log-probs, [pairs]) and
    `chosen_tokens`/`rejected_tokens` (response lengths, [pairs]); for kto, `completion`/`kl` and
    their `_tokens`, and `reference` also the examples' `label` (true: desirable)."""
    if method in UNPAIRED:
        return _kto(policy, reference, beta, desirable_weight, undesirable_weight)
    chosen, rejected = policy["chosen"], policy["rejected"]
    chosen_mean = chosen / policy["chosen_tokens"].clamp(min=1)
    rejected_mean = rejected / policy["rejected_tokens"].clamp(min=1)
    if method in NEEDS_REFERENCE:
        if reference is None:
            raise ValueError(f"{method} needs the reference log-probabilities")
        chosen_ratio, rejected_ratio = chosen - reference["chosen"], rejected - reference["rejected"]
        if method == "dpo":
            delta = beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
        else:
            delta = chosen_ratio / policy["chosen_tokens"].clamp(min=1) - rejected_ratio / policy[
                "rejected_tokens"
            ].clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    elif method == "simpo":
        delta = beta * (chosen_mean - rejected_mean) - gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
        chosen_reward, rejected_reward = beta * chosen_mean.detach(), beta * rejected_mean.detach()
    elif method == "orpo":
        log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
        # the chosen responses' NLL per token over the whole batch, as trl computes it
        nll = -chosen.sum() / policy["chosen_tokens"].sum().clamp(min=1)
        losses = nll - beta * F.logsigmoid(log_odds)
        chosen_reward, rejected_reward = beta * chosen_mean.detach(), beta * rejected_mean.detach()
    else:
        raise ValueError(f"unknown preference method {method!r}; one of {', '.join(METHODS)}")
    stats = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).float(),
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
    }
    return losses.mean(), stats


def _kto(
    policy: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor] | None,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if reference is None:
        raise ValueError("kto needs the reference log-probabilities")
    desirable = reference["label"].to(torch.bool)
    kl = (policy["kl"] - reference["kl"]).mean().detach().clamp(min=0)
    ratio = policy["completion"] - reference["completion"]
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    rewards = beta * ratio.detach()
    chosen_reward, rejected_reward = rewards[desirable], rewards[~desirable]
    stats = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": _mean(chosen_reward) - _mean(rejected_reward),
        # an unpaired example is right when its implicit reward has its label's sign
        "rewards/accuracies": ((rewards > 0) == desirable).float(),
        "logps/chosen": policy["completion"].detach()[desirable],
        "logps/rejected": policy["completion"].detach()[~desirable],
        "kl": kl,
    }
    return losses.mean(), stats


def _mean(values: torch.Tensor) -> torch.Tensor:
    """The mean, 0 for none (a batch may hold no example of one label)."""
    return values.mean() if values.numel() else values.new_zeros(())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate near 0 and for very negative x."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
