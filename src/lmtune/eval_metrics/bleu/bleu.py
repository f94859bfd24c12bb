"""Corpus BLEU (sacreBLEU defaults: 13a tokenizer, exp smoothing), with per-example sufficient
statistics so corpus BLEU can be recomputed on any resample of the examples."""

import datasets
import evaluate
from sacrebleu.metrics import BLEU


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of str (one per prediction)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        bleu = BLEU()
        corpus = bleu.corpus_score(list(predictions), [list(references)])
        stats = []
        for prediction, reference in zip(predictions, references, strict=True):
            one = bleu.corpus_score([prediction], [[reference]])
            stats.append(
                {"counts": one.counts, "totals": one.totals, "sys_len": one.sys_len, "ref_len": one.ref_len}
            )
        return {"bleu": corpus.score, "per_example": stats}


def corpus_bleu_from_stats(stats: list[dict]) -> float:
    """Corpus BLEU of a set of examples from their summed sufficient statistics."""
    n = len(stats[0]["counts"]) if stats else 4
    counts = [sum(s["counts"][i] for s in stats) for i in range(n)]
    totals = [sum(s["totals"][i] for s in stats) for i in range(n)]
    sys_len, ref_len = sum(s["sys_len"] for s in stats), sum(s["ref_len"] for s in stats)
    return BLEU.compute_bleu(counts, totals, sys_len, ref_len, smooth_method="exp").score
