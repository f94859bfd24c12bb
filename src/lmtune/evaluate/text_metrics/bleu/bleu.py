"""Corpus BLEU (sacreBLEU defaults: 13a tokenizer, exp smoothing), with per-example sufficient
statistics so corpus BLEU can be recomputed on any resample of the examples."""

import evaluate
from sacrebleu.metrics import BLEU

from lmtune.evaluate.text_metrics import text_pair_info


class Bleu(evaluate.Metric):
    def _info(self):
        return text_pair_info(__doc__)

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
