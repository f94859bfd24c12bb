"""Log-probabilities of many responses in one forward pass: each response's prompt and answer a
passage of a packed row, kept apart by the same per-passage (varlen) attention SFT trains with, so
a batch of preference pairs carries no padding. Families whose attention the varlen path cannot
compute exactly (lmtune.train.exact_path) get padded rows instead; both give the same numbers.

The head runs a few hundred positions at a time, recomputed in the backward pass, so no step holds
a whole row's vocabulary-wide logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from lmtune.data.batching import collate, collate_rows
from lmtune.model.head import head_logits, head_transform
from lmtune.train.kernels import packed_segments

CHUNK = 256  # positions whose logits exist at once


def sequence_logps(model, seqs: list, pad_id: int, packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's learned tokens, how many there are), in the order
    of `seqs`. A token is learned where its Sequence.mask is 1 (the response); the first token of
    each sequence is never scored. `model` is the PeftModel (or a plain causal LM)."""
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
    hidden, labels, owner = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), owner.reshape(-1)
    scored = labels != -100
    token_logps = []
    for start in range(0, hidden.shape[0], CHUNK):
        rows = slice(start, start + CHUNK)
        token_logps.append(
            checkpoint(_label_logps, head, hidden[rows], labels[rows], scale, softcap, use_reentrant=False)
        )
    token_logps = torch.cat(token_logps) * scored
    sums = torch.zeros(len(seqs), device=device, dtype=token_logps.dtype).index_add(0, owner, token_logps)
    counts = torch.zeros(len(seqs), device=device, dtype=torch.long).index_add(0, owner, scored.long())
    return sums, counts


def _label_logps(head, hidden: torch.Tensor, labels: torch.Tensor, scale: float, softcap) -> torch.Tensor:
    logits = head_logits(head, hidden, scale, softcap)
    return torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
