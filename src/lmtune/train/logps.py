"""Per-token log-probabilities of many sequences in one forward pass: each sequence a passage of a
packed row, kept apart by the same per-passage (varlen) attention SFT trains with, so a batch
carries no padding. Families whose attention the varlen path cannot compute exactly
(lmtune.train.exact_path) get padded rows instead; both give the same numbers. Preference tuning
sums them per response (lmtune.align.logps); RL weighs them token by token (lmtune.rl.losses).

The head runs on the learned positions only (a prompt's positions predict nothing that is
scored), a few hundred at a time, recomputed in the backward pass, so no step holds a whole row's
vocabulary-wide logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from lmtune.data.batching import collate, collate_rows
from lmtune.model.head import head_logits, head_transform
from lmtune.train.kernels import packed_segments

CHUNK = 256  # positions whose logits exist at once


def token_logps(
    model, seqs: list, pad_id: int, packed: bool = True, temperature: float = 1.0, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probability of every learned token, the sequence each belongs to, and with `entropy`
    the entropy of the distribution it was drawn from (no gradient)), in the order of `seqs` and
    of their tokens. A token is learned where its Sequence.mask is 1 (a response); the first token
    of a sequence is never scored. Logits are divided by `temperature` first, as they were when
    sampling. `model` is the PeftModel (or a plain causal LM)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    if packed:
        batch = collate_rows([seqs], pad_id)
        extra = packed_segments(batch["position_ids"])
        # the sequence each target token belongs to: positions restart at 0 at each sequence
        owner = (batch["position_ids"] == 0).long().cumsum(-1) - 1
    else:
        batch = collate(seqs, pad_id)
        extra = {}
        owner = torch.arange(len(seqs))[:, None].expand_as(batch["input_ids"])
    labels = batch.pop("labels")[:, 1:].to(device)
    owner = owner[:, 1:].to(device)
    inputs = {k: v.to(device) for k, v in batch.items()}
    hidden = base.base_model(**inputs, use_cache=False, **extra).last_hidden_state[:, :-1]
    head, (scale, softcap) = base.get_output_embeddings(), head_transform(base.config)
    labels, owner = labels.reshape(-1), owner.reshape(-1)
    keep = (labels != -100).nonzero().squeeze(1)  # the head runs on learned positions only
    hidden, labels = hidden.reshape(-1, hidden.shape[-1])[keep], labels[keep]
    logps, entropies = [], []
    for start in range(0, max(len(keep), 1), CHUNK):  # at least once: an empty result keeps its graph
        rows = slice(start, start + CHUNK)
        logps.append(
            checkpoint(
                _label_logps,
                head,
                hidden[rows],
                labels[rows],
                scale,
                softcap,
                temperature,
                use_reentrant=False,
            )
        )
        if entropy:
            with torch.no_grad():
                entropies.append(_entropy(head, hidden[rows], scale, softcap, temperature))
    return torch.cat(logps), owner[keep], torch.cat(entropies) if entropy else None


def sequence_sums(logps: torch.Tensor, owner: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each of `count` sequences, how many tokens it has)."""
    sums = torch.zeros(count, device=logps.device, dtype=logps.dtype).index_add(0, owner, logps)
    counts = torch.zeros(count, device=logps.device, dtype=torch.long).index_add(
        0, owner, torch.ones_like(owner)
    )
    return sums, counts


def _label_logps(head, hidden, labels, scale: float, softcap, temperature: float) -> torch.Tensor:
    logits = head_logits(head, hidden, scale, softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)


def _entropy(head, hidden, scale: float, softcap, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(head_logits(head, hidden, scale, softcap) / temperature, -1)
    return -(logp.exp() * logp).sum(-1)
