"""Evaluation metrics: agreement with the reference libraries, intervals, edge cases."""

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sacrebleu import corpus_bleu

from lmtune.evaluate.generation import greedy_continuations
from lmtune.evaluate.scores import (
    EvaluationError,
    bootstrap,
    eval_markdown,
    generation_pairs,
    generation_per_example,
    likelihood_per_passage,
    metric_functions,
    preference_functions,
)

PREDICTIONS = ["the cat sat on the mat", "", "O Romeo, wherefore art thou", "héllo wörld — ça va?", "to be"]
REFERENCES = [
    "the cat is on the mat",
    "something here",
    "O Romeo, Romeo",
    "héllo wörld — ça va?",
    "to be or not to be",
]


def refs(references):
    return [[r] for r in references]


def test_bleu_and_rouge_equal_sacrebleu_and_rouge_score():
    per = generation_per_example(PREDICTIONS, refs(REFERENCES))
    fns = metric_functions({"nll": np.ones(5), "hits": np.ones(5), "count": np.ones(5)}, per)
    everything = np.arange(len(PREDICTIONS))
    assert fns["bleu"](everything) == pytest.approx(corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for kind in ("rouge1", "rouge2", "rougeL"):
        expected = np.mean(
            [scorer.score(r, p)[kind].fmeasure for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
        )
        assert fns[kind](everything) == pytest.approx(expected, abs=1e-12)


def test_exact_match_and_answer_f1_follow_squad():
    """Normalised (case, punctuation, articles), best of the accepted answers."""
    predictions = ["The Cat sat.", "", "", "A, b!", "x", "Paris", "a dog"]
    accepted = [["cat sat mat"], [""], ["ref"], ["b"], ["y"], ["London", "paris"], ["the dog", "dogs"]]
    per = generation_per_example(predictions, accepted, answers=True)
    assert per["answer_f1"].tolist() == pytest.approx([0.8, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    assert per["exact_match"].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    text_only = generation_per_example(predictions, accepted)
    assert "answer_f1" not in text_only and "exact_match" not in text_only  # not for text continuations


def test_references_shorter_than_m_and_passages_too_short_for_a_prompt():
    seqs = [list(range(10)), list(range(5)), list(range(4)), list(range(3))]
    pairs = generation_pairs(seqs, prompt_tokens=4, reference_tokens=3)
    assert pairs == [([0, 1, 2, 3], [4, 5, 6]), ([0, 1, 2, 3], [4])]  # second: shorter than M; others dropped
    per = generation_per_example(["four", "x y z"], [["four"], ["x"]])  # a short reference still scores
    assert per["rouge1"].tolist() == pytest.approx([1.0, 0.5])


def test_empty_generations_score_zero_without_errors():
    per = generation_per_example(["", ""], [["a reference"], ["another"]], answers=True)
    assert per["answer_f1"].tolist() == [0.0, 0.0] and per["rouge1"].tolist() == [0.0, 0.0]
    fns = metric_functions({"nll": np.ones(2), "hits": np.ones(2), "count": np.ones(2)}, per)
    assert fns["bleu"](np.arange(2)) == 0.0


def test_bootstrap_intervals_and_paired_deltas():
    rng = np.random.default_rng(0)
    n = 50
    base = {
        "nll": rng.uniform(1, 3, n) * 20,
        "hits": rng.integers(0, 10, n).astype(float),
        "count": np.full(n, 20.0),
    }
    better = {**base, "nll": base["nll"] * 0.9}
    fns = {
        "base": metric_functions(base, None),
        "same": metric_functions(base, None),
        "better": metric_functions(better, None),
    }
    result = bootstrap(fns, {"perplexity": n, "token_accuracy": n}, "base", resamples=300, seed=1)
    for name in fns:
        entry = result[name]["perplexity"]
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    assert result["same"]["perplexity"]["delta_ci95"] == [0.0, 0.0]  # paired: identical models, no noise
    lo, hi = result["better"]["perplexity"]["delta_ci95"]
    assert hi < 0 and result["better"]["perplexity"]["delta"] < 0
    page = eval_markdown(
        result,
        {
            "passages": n,
            "tokens_scored": 1000,
            "generation_examples": 0,
            "prompt_tokens": 32,
            "reference_tokens": 32,
            "dtype": "fp32",
            "bootstrap_resamples": 300,
        },
        [],
        {},
    )
    assert "| perplexity |" in page and "Δ" in page


def test_preference_metrics_of_held_out_pairs_and_the_implicit_reward_against_the_start():
    """Pairs scored as passages (chosen, rejected side by side): won summed and per token, the mean
    margin, and the implicit reward accuracy (the margin above the starting policy's), 0 for it."""
    # nll of chosen/rejected for 3 pairs; counts give per-token log-likelihoods
    start = {"nll": np.array([5.0, 6.0, 4.0, 3.0, 9.0, 9.5]), "count": np.array([5, 5, 2, 6, 3, 3])}
    tuned = {"nll": np.array([4.0, 7.0, 4.0, 2.0, 8.0, 9.5]), "count": np.array([5, 5, 2, 6, 3, 3])}
    everything = np.arange(3)
    fns = preference_functions(tuned, start)
    # margins (chosen - rejected log-likelihood): 3, -2, 1.5; per token: -0.8 > -1.4, -2 < -1/3, -8/3 > -9.5/3
    assert fns["preference_accuracy"](everything) == pytest.approx(2 / 3)
    assert fns["preference_accuracy_per_token"](everything) == pytest.approx(2 / 3)
    assert fns["preference_margin"](everything) == pytest.approx((3 - 2 + 1.5) / 3)
    # the start's margins 1, -1, 0.5: tuned is above on pairs 0 and 2, below on pair 1
    assert fns["reward_accuracy"](everything) == pytest.approx(2 / 3)
    assert preference_functions(start, start)["reward_accuracy"](everything) == 0
    assert fns["preference_accuracy"](np.array([1, 1])) == 0


def test_too_few_passages_for_the_bootstrap_is_a_clear_error():
    fns = {"base": metric_functions({"nll": np.ones(3), "hits": np.ones(3), "count": np.ones(3)}, None)}
    with pytest.raises(EvaluationError, match=r"only 3 test examples.*eval\.max_examples"):
        bootstrap(fns, {"perplexity": 3}, "base", resamples=10, seed=0)


class OnlyEos(torch.nn.Module):
    """A model that emits only the end token: generation must come back empty, not crash."""

    def __init__(self, eos):
        super().__init__()
        self.eos = eos

    def generate(self, input_ids, max_new_tokens, eos_token_id, **kwargs):
        tail = torch.full((input_ids.shape[0], 1), eos_token_id)
        return torch.cat([input_ids, tail], dim=1)


def test_a_model_that_emits_only_the_end_token():
    out = greedy_continuations(OnlyEos(2), [[5, 6], [7]], 8, pad_id=2, eos_id=2, batch_size=2)
    assert out == [[], []]
    per = generation_per_example(["", ""], [["x y"], ["z"]], answers=True)
    assert per["answer_f1"].sum() == 0 and per["exact_match"].sum() == 0


def test_greedy_continuations_are_the_same_batched_or_one_by_one(tiny_base, tiny_seqs):
    from lmtune.model.load import load_full

    seqs, tokenizer = tiny_seqs
    model = load_full(tiny_base, torch.float32)
    prompts = [s[:12] for s in seqs[:6]] + [seqs[0][:5]]  # different lengths: left padding matters
    batched = greedy_continuations(
        model, prompts, 6, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size=7
    )
    single = [
        greedy_continuations(model, [p], 6, tokenizer.pad_token_id, tokenizer.eos_token_id, 1)[0]
        for p in prompts
    ]
    assert batched == single


def test_likelihood_per_passage_sums_to_the_totals(tiny_base, tiny_seqs):
    from lmtune.model.load import load_full

    seqs, tokenizer = tiny_seqs
    per = likelihood_per_passage(load_full(tiny_base, torch.float32), seqs, 4, tokenizer.pad_token_id)
    assert per["count"].tolist() == [len(s) - 1 for s in seqs]
    assert (per["hits"] <= per["count"]).all() and (per["nll"] > 0).all()


def own_logits_scores(model, seqs):
    """Each passage alone through the model's own logits (no padding, no separate head)."""
    nll, hits = [], []
    with torch.no_grad():
        for seq in seqs:
            logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].float()
            target = torch.tensor(seq[1:])
            keep = torch.ones_like(target, dtype=torch.bool)
            if getattr(seq, "mask", None) is not None:
                keep = torch.tensor(seq.mask[1:]) == 1
            nll.append(float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")))
            hits.append(int((logits.argmax(-1) == target)[keep].sum()))
    return np.array(nll), np.array(hits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_separate_head_scores_every_passage_as_the_models_own_logits(tiny_base, tiny_seqs, dtype):
    """Decoder on padded batches + head on the scored tokens only = each passage alone through the
    model's own forward: per-passage NLL within rounding, the same top-1 hits; masked tokens
    (conversations: answers only) are not scored."""
    from lmtune.data.sequences import Sequence
    from lmtune.evaluate import scores
    from lmtune.model.load import load_full

    seqs, tokenizer = tiny_seqs
    masked = Sequence(seqs[0], mask=[0] * 10 + [1] * (len(seqs[0]) - 10))  # a prompt, then an answer
    seqs = [masked, *seqs[1:9]]
    model = load_full(tiny_base, dtype)
    assert scores.separate_head(model) is not None  # the path under test
    per = likelihood_per_passage(model, seqs, 4, tokenizer.pad_token_id)
    nll, hits = own_logits_scores(model, seqs)
    assert per["count"].tolist() == [len(seqs[0]) - 10, *[len(s) - 1 for s in seqs[1:]]]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: padding changes the blocking
    assert per["nll"] == pytest.approx(nll, rel=tolerance)
    assert np.abs(per["hits"] - hits).sum() <= (0 if dtype == torch.float32 else 2)


def test_a_head_that_does_more_than_scale_and_cap_is_scored_through_the_models_logits(
    tiny_base, tiny_seqs, monkeypatch
):
    from lmtune.evaluate import scores
    from lmtune.model.load import load_full

    seqs, tokenizer = tiny_seqs
    model = load_full(tiny_base, torch.float32)
    expected = likelihood_per_passage(model, seqs[:6], 3, tokenizer.pad_token_id)
    monkeypatch.setattr(scores, "head_transform", lambda config: (2.0, None))  # a scale the model lacks
    assert scores.separate_head(model) is None
    fallback = likelihood_per_passage(model, seqs[:6], 3, tokenizer.pad_token_id)
    assert fallback["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert fallback["hits"].tolist() == expected["hits"].tolist()


def test_the_sweep_page_ranks_only_runs_that_share_model_data_and_steps():
    """Perplexities of different models, data or schedules are not comparable: each such group gets
    its own table, best first within it."""
    import pandas as pd

    from lmtune.track.compare import table

    rows = [
        {"experiment": "a", "model": "llama2_7b", "data": "alpaca", "r": 8, "steps": 1000, "perplexity": 6.1},
        {
            "experiment": "b",
            "model": "smollm2_135m",
            "data": "shakespeare",
            "r": 8,
            "steps": 10,
            "perplexity": 54.0,
        },
        {
            "experiment": "c",
            "model": "smollm2_135m",
            "data": "shakespeare",
            "r": 4,
            "steps": 10,
            "perplexity": 53.8,
        },
    ]
    page = table(pd.DataFrame(rows).sort_values("perplexity"), failed=[])
    sections = page.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "llama2_7b on alpaca, 1000 steps",
        "smollm2_135m on shakespeare, 10 steps",
    ]
    smollm = [line for line in sections[1].splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in smollm] == ["| c", "| b"]  # 53.8 before 54.0
    assert "| llama2_7b |" not in page  # the group is the heading, not a column
