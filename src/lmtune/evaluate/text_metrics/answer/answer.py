"""Exact match and answer F1 of generated answers against one or more reference answers (SQuAD's
definitions): answers are normalised (lowercase, punctuation and the articles a/an/the removed,
whitespace collapsed); F1 is the bag-of-words overlap; each example keeps its best reference."""

import re
import string
from collections import Counter

import datasets
import evaluate

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> list[str]:
    return _ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split()


def f1(prediction: str, reference: str) -> float:
    pred, ref = normalise(prediction), normalise(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


class Answer(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of lists of str (the accepted answers)",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        exact = [
            max(float(normalise(p) == normalise(r)) for r in refs)
            for p, refs in zip(predictions, references, strict=True)
        ]
        scores = [max(f1(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True)]
        n = max(len(scores), 1)
        return {
            "exact_match": sum(exact) / n,
            "answer_f1": sum(scores) / n,
            "per_example": {"exact_match": exact, "answer_f1": scores},
        }
