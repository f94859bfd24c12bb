"""Log-probabilities of many responses in one forward pass, summed per response (preference losses
compare whole responses): lmtune.train.logps packs them, each prompt and answer a passage of one row."""

from __future__ import annotations

import torch

from lmtune.train.logps import sequence_sums, token_logps


def sequence_logps(model, seqs: list, pad_id: int, packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's learned tokens, how many there are), in the order
    of `seqs`. A token is learned where its Sequence.mask is 1 (the response); the first token of
    each sequence is never scored. `model` is the PeftModel (or a plain causal LM)."""
    logps, owner, _ = token_logps(model, seqs, pad_id, packed)
    return sequence_sums(logps, owner, len(seqs))
