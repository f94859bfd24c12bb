"""Scores of a causal LM on held-out passages: perplexity and next-token accuracy."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from lmtune.data import collate
from lmtune.modeling import device


@torch.no_grad()
def language_model_scores(model, seqs: list[list[int]], batch_size: int, pad_id: int,
                          desc: str = "score") -> dict[str, float]:  # fmt: skip
    """Perplexity = exp(mean NLL) over every predicted token of every passage; each passage is
    scored on its own from its first token (which is not itself predicted); padding is masked.
    Token accuracy = share of those positions where the top-1 prediction is the next token."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    # Longest first: padding waste is smallest when similar lengths share a batch.
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = collate([seqs[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device()) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        nll += float(torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum"))
        correct += int((logits.argmax(-1)[mask] == targets[mask]).sum())
        count += int(mask.sum())
    if count == 0:
        raise ValueError("no tokens to score: the test split is empty or every passage is one token")
    mean_nll = nll / count
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "token_accuracy": correct / count,
        "tokens_scored": count,
    }
