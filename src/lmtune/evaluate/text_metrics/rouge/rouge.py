"""ROUGE-1/2/L F-measure per example (rouge_score, no stemming), and their means."""

import evaluate
from rouge_score import rouge_scorer

from lmtune.evaluate.text_metrics import text_pair_info

TYPES = ("rouge1", "rouge2", "rougeL")


class Rouge(evaluate.Metric):
    def _info(self):
        return text_pair_info(__doc__)

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(list(TYPES), use_stemmer=False)
        per_example = {t: [] for t in TYPES}
        for prediction, reference in zip(predictions, references, strict=True):
            scores = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
            for t in TYPES:
                per_example[t].append(scores[t].fmeasure)
        result = {t: sum(v) / max(len(v), 1) for t, v in per_example.items()}
        return {**result, "per_example": per_example}
