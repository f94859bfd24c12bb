"""Token F1: bag-of-words overlap between a generation and its reference (SQuAD-style).

Words are lowercased, punctuation is stripped. Both empty: 1.0; one empty: 0.0.
"""

import re
import string
from collections import Counter

import evaluate

from lmtune.eval_metrics import text_pair_info

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def words(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def f1(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


class TokenF1(evaluate.Metric):
    def _info(self):
        return text_pair_info(__doc__)

    def _compute(self, predictions, references):
        scores = [f1(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"token_f1": sum(scores) / max(len(scores), 1), "per_example": scores}
