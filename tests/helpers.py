"""Helpers the tests share that the pipeline itself does not need."""

import torch

from lmtune.data.batching import collate_rows, pack
from lmtune.evaluate.scores import EvaluationError, _perplexity, likelihood_per_passage


def collate_packed(seqs: list[list[int]], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """`seqs` packed into as few rows of `capacity` tokens as fit them (see `collate_rows`)."""
    return collate_rows(pack(seqs, capacity), pad_id)


def language_model_scores(
    model, seqs: list[list[int]], batch_size: int, pad_id: int, desc: str = "score"
) -> dict[str, float]:
    """Perplexity = exp(mean NLL over every predicted token); token accuracy = top-1 hit rate."""
    per = likelihood_per_passage(model, seqs, batch_size, pad_id, desc)
    if per["count"].sum() == 0:
        raise EvaluationError("no tokens to score: the test split is empty or every passage is one token")
    return {
        "perplexity": _perplexity(per, slice(None)),
        "nll": float(per["nll"].sum() / per["count"].sum()),
        "token_accuracy": float(per["hits"].sum() / per["count"].sum()),
        "tokens_scored": int(per["count"].sum()),
    }
