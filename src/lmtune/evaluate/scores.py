"""Scores of a causal LM on held-out data, with bootstrap confidence intervals.

Likelihood metrics use every learned token of every test sequence (all of a passage's; only the
answers of a conversation). Generation metrics: for text, the first `prompt_tokens` tokens of a
passage continued greedily against the next `reference_tokens`; for conversations, each test
question answered greedily against the answers the split gives it (exact match, answer F1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmtune import LmtuneError
from lmtune.config import MIN_EVAL_EXAMPLES
from lmtune.data.batching import collate
from lmtune.model.hardware import device
from lmtune.model.head import head_logits, head_mismatch, head_transform

LIKELIHOOD_METRICS = ("perplexity", "token_accuracy")
TEXT_METRICS = ("rouge1", "rouge2", "rougeL", "bleu")  # of a generation against its reference
ANSWER_METRICS = ("exact_match", "answer_f1")  # conversations: of an answer against the accepted ones
TASK_METRICS = ("task_accuracy", "task_reward", "task_answer_tokens", "task_pass_at_k")  # after RL


class EvaluationError(LmtuneError, ValueError):
    """The evaluation cannot give a meaningful number (say, too few passages for intervals)."""


def generation_pairs(
    seqs: list[list[int]], prompt_tokens: int, reference_tokens: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt, reference) per passage: the first `prompt_tokens` tokens, then up to the next
    `reference_tokens` (fewer when the passage ends sooner). Passages with no token after the
    prompt have nothing to compare and are left out."""
    return [
        (s[:prompt_tokens], s[prompt_tokens : prompt_tokens + reference_tokens])
        for s in seqs
        if len(s) > prompt_tokens
    ]


HEAD_CHUNK = 1024  # scored tokens per head matmul: [1024, vocab] fp32 logits at a time


def separate_head(model) -> tuple | None:
    """(decoder, head, scale, cap) when the model's logits are its head over the decoder's last
    hidden state with the family's known scale and cap (checked on a few tokens), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or not hasattr(base, "base_model") or base.base_model is base:
        return None
    scale, softcap = head_transform(base.config)
    if head_mismatch(base, scale, softcap) > 1e-2:  # a head that does more than scale and cap
        return None
    return base.base_model, head, scale, softcap


def _score_tokens(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: negative log-likelihood of the target and whether it is the top-1 prediction."""
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return nll, logits.argmax(-1) == targets


@torch.no_grad()
def likelihood_per_passage(
    model,
    seqs: list[list[int]],
    batch_size: int,
    pad_id: int,
    desc: str = "score",
    head_path: tuple | None | str = "auto",
) -> dict[str, np.ndarray]:
    """Per passage: summed NLL, tokens predicted, top-1 hits. Each passage is scored on its own
    from its first token (which is not itself predicted); padding is masked.

    Where the head is separable (`separate_head`; head_path="auto" checks, a caller scoring one
    model many times passes what it returned), the decoder runs on the batch and the head only on
    the scored tokens, HEAD_CHUNK at a time: the same numbers as the model's own logits without a
    [batch, length, vocab] fp32 tensor per batch. head_path=None: the model's own logits, whole
    batch (the reference)."""
    model.eval()
    separate = separate_head(model) if head_path == "auto" else head_path
    nll, hits, count = np.zeros(len(seqs)), np.zeros(len(seqs)), np.zeros(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
    for start in tqdm(
        range(0, len(order), batch_size), desc=f"{desc}: likelihood", unit="batch", leave=False
    ):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device()) for k, v in collate([seqs[i] for i in rows], pad_id).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        row_of, wanted = mask.nonzero(as_tuple=True)[0], targets[mask]
        if not len(wanted):  # nothing scored in this batch (prompts only)
            token_nll, token_hit = torch.zeros(0, device=wanted.device), wanted.bool()
        elif separate is None:  # the model's own logits, whole batch
            logits = model(**inputs).logits[:, :-1][mask]
            token_nll, token_hit = _score_tokens(logits.float(), wanted)
        else:
            decoder, head, scale, softcap = separate
            hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1][mask]
            scored = [
                _score_tokens(
                    head_logits(head, hidden[i : i + HEAD_CHUNK], scale, softcap), wanted[i : i + HEAD_CHUNK]
                )
                for i in range(0, len(wanted), HEAD_CHUNK)
            ]
            token_nll, token_hit = (torch.cat(parts) for parts in zip(*scored, strict=True))
        per_row = torch.zeros(len(rows), dtype=torch.float64, device=token_nll.device)
        nll[rows] = per_row.index_add(0, row_of, token_nll.double()).cpu().numpy()
        hits[rows] = torch.bincount(row_of[token_hit], minlength=len(rows)).cpu().numpy()
        count[rows] = mask.sum(1).cpu().numpy()
    return {"nll": nll, "hits": hits, "count": count}


def _perplexity(per: dict, idx) -> float:
    return math.exp(per["nll"][idx].sum() / per["count"][idx].sum())


def _load_local(name: str):
    """The metric module folder `text_metrics/<name>` through evaluate (works offline)."""
    import evaluate

    return evaluate.load(str(Path(__file__).parent / "text_metrics" / name))


def corpus_bleu_from_stats(stats: list[dict]) -> float:
    """Corpus BLEU of a set of examples from their summed sufficient statistics (the bleu
    module returns them per example), so any bootstrap resample gets a true corpus BLEU."""
    from sacrebleu.metrics import BLEU

    n = len(stats[0]["counts"]) if stats else 4
    counts = [sum(s["counts"][i] for s in stats) for i in range(n)]
    totals = [sum(s["totals"][i] for s in stats) for i in range(n)]
    sys_len, ref_len = sum(s["sys_len"] for s in stats), sum(s["ref_len"] for s in stats)
    return BLEU.compute_bleu(counts, totals, sys_len, ref_len, smooth_method="exp").score


def generation_per_example(
    predictions: list[str], references: list[list[str]], answers: bool = False, source: str = "local"
) -> dict:
    """Per-example scores via `evaluate` modules: ROUGE against the first reference and BLEU's
    sufficient statistics; with `answers`, exact match and answer F1 against every accepted answer.
    source="hub" adds the hub's rouge/sacrebleu means as a cross-check (needs network)."""
    first = [refs[0] for refs in references]
    rouge = _load_local("rouge").compute(predictions=predictions, references=first)
    bleu = _load_local("bleu").compute(predictions=predictions, references=first)
    per = {"bleu_stats": bleu["per_example"], **{k: np.array(v) for k, v in rouge["per_example"].items()}}
    if answers:
        scored = _load_local("answer").compute(predictions=predictions, references=references)
        per.update({k: np.array(v) for k, v in scored["per_example"].items()})
    if source == "hub":  # cross-check with the reference implementations when reachable
        import evaluate

        per["hub"] = {
            **evaluate.load("rouge").compute(predictions=predictions, references=first),
            "bleu": evaluate.load("sacrebleu").compute(predictions=predictions, references=references)[
                "score"
            ],
        }
    return per


def metric_functions(likelihood: dict, generation: dict | None) -> dict[str, Callable]:
    """metric name → f(indices) computing it on a subset of examples (for the bootstrap)."""
    fns: dict[str, Callable] = {
        "perplexity": lambda idx: _perplexity(likelihood, idx),
        "token_accuracy": lambda idx: float(likelihood["hits"][idx].sum() / likelihood["count"][idx].sum()),
    }
    if generation is not None:
        stats = generation["bleu_stats"]
        for name in (*ANSWER_METRICS, "rouge1", "rouge2", "rougeL"):
            if name in generation:
                fns[name] = lambda idx, a=generation[name]: float(a[idx].mean())
        fns["bleu"] = lambda idx: corpus_bleu_from_stats([stats[i] for i in idx])
    return fns


def preference_functions(pairs: dict, reference: dict) -> dict[str, Callable]:
    """Held-out preference pairs, scored as passages with each pair's chosen and rejected response
    side by side (chosen first): metric name → f(pair indices). `reference` is the starting policy's
    scoring of the same pairs in the same run, against which the implicit reward is taken (its own
    reward accuracy is 0: no pair's log-ratio margin is above zero)."""
    logp, tokens = -pairs["nll"], np.maximum(pairs["count"], 1)
    chosen, rejected = logp[0::2], logp[1::2]
    margin = chosen - rejected
    per_token = chosen / tokens[0::2] > rejected / tokens[1::2]
    reward_margin = margin - (-reference["nll"][0::2] + reference["nll"][1::2])
    return {
        "preference_accuracy": lambda idx: float((margin[idx] > 0).mean()),
        "preference_accuracy_per_token": lambda idx: float(per_token[idx].mean()),
        "preference_margin": lambda idx: float(margin[idx].mean()),
        "reward_accuracy": lambda idx: float((reward_margin[idx] > 0).mean()),
    }


def bootstrap(
    models: dict[str, dict[str, Callable]],
    sizes: dict[str, int],
    baseline: str,
    resamples: int,
    seed: int,
    min_examples: int = MIN_EVAL_EXAMPLES,
) -> dict:
    """Point estimate, 95% percentile interval, and paired delta vs `baseline` for each metric.

    Each resample draws passages with replacement; every model is scored on the same draw, so
    the delta's interval reflects the difference itself, not two independent noises.
    `sizes` gives the number of examples behind each metric (likelihood and generation sets).
    """
    for metric, n in sizes.items():
        if n < min_examples:
            raise EvaluationError(
                f"{metric}: only {n} test examples; bootstrap intervals need at least {min_examples}. "
                "Raise eval.max_examples, eval.generation_examples or data.test_fraction."
            )
    rng = np.random.default_rng(seed)
    draws = {n: rng.integers(0, n, size=(resamples, n)) for n in set(sizes.values())}
    result: dict = {name: {} for name in models}
    for metric, n in sizes.items():
        everything = np.arange(n)
        samples = {name: np.array([fns[metric](d) for d in draws[n]]) for name, fns in models.items()}
        for name, fns in models.items():
            entry = {"value": fns[metric](everything), "ci95": _interval(samples[name])}
            if name != baseline:
                entry["delta"] = entry["value"] - models[baseline][metric](everything)
                entry["delta_ci95"] = _interval(samples[name] - samples[baseline])
            result[name][metric] = entry
    return result


def _interval(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


EXPLAIN = {
    "perplexity": "exp(mean negative log-likelihood) over every predicted token; lower is better",
    "token_accuracy": "share of tokens where the top-1 prediction is the true next token",
    "exact_match": "share of answers equal to an accepted answer after SQuAD normalisation",
    "answer_f1": "SQuAD answer F1: word overlap with the best-matching accepted answer, normalised",
    "rouge1": "ROUGE-1 F-measure: unigram overlap (rouge_score, no stemming)",
    "rouge2": "ROUGE-2 F-measure: bigram overlap",
    "rougeL": "ROUGE-L F-measure: longest common subsequence",
    "bleu": "corpus BLEU (sacreBLEU defaults), 0-100",
    "answer_tokens": "mean length of the greedy answers in tokens (preference tuning tends to lengthen them)",
    "preference_accuracy": "share of held-out preference pairs whose chosen response is the more likely",
    "preference_accuracy_per_token": "the same, comparing log-likelihood per response token",
    "preference_margin": "mean log-likelihood of the chosen response minus the rejected one, held-out pairs",
    "reward_accuracy": "share of held-out pairs whose log-likelihood margin is above the starting policy's "
    "(DPO's implicit reward accuracy; 0 for the starting policy itself)",
    "task_accuracy": "after RL: the task's score of the greedy answers to its held-out questions",
    "task_reward": "after RL: mean reward of those answers under rl.rewards (the weighted sum RL trained on)",
    "task_answer_tokens": "after RL: mean length of those answers in tokens",
    "task_pass_at_k": "after RL: share of held-out questions (the first eval.generation_examples) at least one "
    "of k sampled answers gets right (k = eval.task_samples, at rl.temperature and rl.top_p; the best score of "
    "the k where the task gives partial credit)",
}
_PERCENT = {
    "token_accuracy", "exact_match", "answer_f1", "rouge1", "rouge2", "rougeL",
    "preference_accuracy", "preference_accuracy_per_token", "reward_accuracy", "task_accuracy",
    "task_pass_at_k",
}  # fmt: skip


def _fmt(metric: str, value: float, signed: bool = False) -> str:
    if metric in _PERCENT:
        value *= 100
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return text + ("%" if metric in _PERCENT else "")


def eval_markdown(
    scores: dict, settings: dict, references: list[str], examples: dict, speed: dict | None = None
) -> str:
    """metrics/eval.md: one row per metric, one column per model, intervals and deltas vs base;
    then load time and greedy generation speed per model (what quantizing bought)."""
    names = list(scores)
    lines = [
        "# Evaluation",
        "",
        f"Test split: {settings['passages']} sequences ({settings['tokens_scored']} tokens scored) for "
        "likelihood metrics; "
        + (
            f"{settings['generation_examples']} test questions answered greedily (up to "
            f"{settings['reference_tokens']} tokens, through the chat template) for answer metrics, "
            "against every answer the split gives each question"
            if settings.get("format") == "chat"
            else f"{settings['generation_examples']} greedy continuations of {settings['prompt_tokens']}-token "
            f"prompts against the next {settings['reference_tokens']} tokens for generation metrics"
        )
        + f". dtype {settings['dtype']}. Brackets: 95% bootstrap interval "
        f"({settings['bootstrap_resamples']} resamples of examples); Δ: paired difference vs base"
        + (
            f"; Δ start: the same vs {settings['task']['starting_policy']}, the policy RL started from "
            f"({settings['task']['questions']} held-out {settings['task']['name']} questions)"
            if settings.get("task", {}).get("starting_policy", "base") != "base"
            else ""
        )
        + ".",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for metric in scores[names[0]]:
        cells = []
        for name in names:
            entry = scores[name][metric]
            lo, hi = entry["ci95"]
            cell = f"{_fmt(metric, entry['value'])} [{_fmt(metric, lo)}, {_fmt(metric, hi)}]"
            if "delta" in entry:
                dlo, dhi = entry["delta_ci95"]
                cell += f"<br>Δ {_fmt(metric, entry['delta'], True)} [{_fmt(metric, dlo, True)}, {_fmt(metric, dhi, True)}]"
            if "delta_vs_start" in entry:  # after RL: against the policy it started from
                dlo, dhi = entry["delta_vs_start_ci95"]
                cell += (
                    f"<br>Δ start {_fmt(metric, entry['delta_vs_start'], True)} "
                    f"[{_fmt(metric, dlo, True)}, {_fmt(metric, dhi, True)}]"
                )
            cells.append(cell)
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    if speed:
        lines += [
            "",
            f"Speed on this machine ({settings.get('device', 'this device')}), KV cache; transformers "
            f"batches {settings.get('batch_size', '?')} prompts, llama.cpp runs one at a time:",
            "",
            "| | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
            "| runtime | " + " | ".join(speed[n].get("runtime", "transformers") for n in names) + " |",
            "| load s | " + " | ".join(f"{speed[n]['load_seconds']:.1f}" for n in names) + " |",
            "| generated tokens/s | "
            + " | ".join(f"{speed[n]['generated_tokens_per_second']:.0f}" for n in names)
            + " |",
        ]
    lines += ["", "## What each metric is", ""]
    lines += [f"- **{m}**: {EXPLAIN[m]}" for m in scores[names[0]]]
    lines += ["", "## First answers" if settings.get("format") == "chat" else "## First continuations", ""]
    for i, reference in enumerate(references):
        lines.append(f"**Reference {i + 1}:** {reference.strip()!r}")
        lines += [f"- {name}: {examples[name][i].strip()!r}" for name in names]
        lines.append("")
    return "\n".join(lines)
