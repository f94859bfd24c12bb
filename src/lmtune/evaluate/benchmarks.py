"""Benchmarks through lm-evaluation-harness, the same tasks and settings on every model the eval
stage scores, and the quality gate over them.

lmtune's own tasks (evaluate/tasks/, lm-eval's task YAML) run offline from what it ships:
`lmtune_test_bpb` (bits per byte of the test split) and `lmtune_chatterbot_mc` (multiple choice
from the chatterbot questions). `eval.task_dir` adds a folder of the user's own task YAMLs; lm-eval's
named tasks (hellaswag, arc_easy, mmlu, ...) need their datasets from the hub, so network.
Models in transformers run through lm-eval's HFLM; a GGUF runs in llama.cpp through `LlamaCppLM`,
lm-eval's model interface over the same llama.cpp context the eval stage scores with.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from lm_eval.api.model import LM
from omegaconf import DictConfig
from tqdm import tqdm

from lmtune import hub_offline
from lmtune.data.sequences import Sequence
from lmtune.evaluate.scores import EvaluationError, likelihood_per_passage, separate_head

TASKS_DIR = Path(__file__).parent / "tasks"
SHIPPED = ("lmtune_test_bpb", "lmtune_chatterbot_mc")


def task_manager(cfg: DictConfig):
    """lm-eval's task index over lmtune's tasks and eval.task_dir; lm-eval's own (thousands of
    YAMLs, seconds to index) only when eval.benchmarks names a task outside lmtune's or there is
    an eval.task_dir."""
    from lm_eval.tasks import TaskManager

    include = [str(TASKS_DIR), *([str(Path(cfg.eval.task_dir).resolve())] if cfg.eval.task_dir else [])]
    metadata = {"processed": cfg.paths.processed}
    own = TaskManager(include_path=include, include_defaults=False, metadata=metadata)
    if not cfg.eval.task_dir and set(cfg.eval.benchmarks) <= set(own.all_tasks):
        return own  # (a task_dir's groups may name lm-eval's tasks: the whole index then)
    return TaskManager(include_path=include, metadata=metadata)


def check_tasks(cfg: DictConfig, manager=None) -> None:
    """Every task named in eval.benchmarks exists, and offline none needs the hub: said in one line
    before any model loads, not after minutes of retries."""
    if not cfg.eval.benchmarks:
        return
    if cfg.eval.task_dir and not Path(cfg.eval.task_dir).is_dir():
        raise EvaluationError(f"eval.task_dir={cfg.eval.task_dir}: no such folder of lm-eval task YAMLs")
    manager = manager or task_manager(cfg)
    known = set(manager.all_tasks)
    for name in cfg.eval.benchmarks:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=3)
            raise EvaluationError(
                f"eval.benchmarks: no lm-eval task '{name}'"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; lmtune's own: {', '.join(SHIPPED)}; yours: a YAML in eval.task_dir"
            )
        if hub_offline() and _needs_hub(manager, name):
            raise EvaluationError(
                f"eval.benchmarks: task '{name}' reads its dataset from the Hugging Face hub, and "
                "HF_HUB_OFFLINE=1. With network run with HF_HUB_OFFLINE=0; offline, use lmtune's own "
                f"tasks ({', '.join(SHIPPED)}) or a task of yours in eval.task_dir"
            )


def _needs_hub(manager, name: str, depth: int = 0) -> bool:
    """Whether a task, or any task of a group or tag, reads its dataset from the hub (not built by
    a function of its own, nor read from local files)."""
    entry = manager.task_index.get(name)
    if entry is None or depth > 4:
        return False
    config = entry.cfg or {}
    if entry.kind.name == "TAG":
        members = [n for n, e in manager.task_index.items() if name in (e.tags or ())]
    elif isinstance(config.get("task"), list):  # a group
        members = [t if isinstance(t, str) else t.get("task", "") for t in config["task"]]
    else:
        if config.get("custom_dataset"):
            return False
        source = str(config.get("dataset_path", ""))
        return source not in ("json", "csv", "parquet", "text", "arrow") and not Path(source).exists()
    return any(_needs_hub(manager, member, depth + 1) for member in members)


class LlamaCppLM(LM):
    """lm-eval's model interface (log-likelihoods) over a GGUF in llama.cpp, with the tokenizer
    training used; it encodes requests as lm-eval's HFLM does, so the numbers compare."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        bos = tokenizer.bos_token_id
        self.prefix = [bos if bos is not None else tokenizer.eos_token_id]

    def _encode(self, text: str) -> list[int]:
        """As HFLM's tok_encode: the tokenizer's own special tokens (Llama-2's BOS), unless the text
        already starts with the prefix token."""
        if text.startswith(self.tokenizer.decode(self.prefix)):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())  # trailing spaces belong to the continuation
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, start = self._encode(context + continuation), self._encode(context)
        return (start or self.prefix), whole[len(start) :]

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = context + continuation
        logits = self.model.logits(ids)[len(context) - 1 : len(ids) - 1]
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._score(*self._pair(*r.args)) for r in tqdm(requests, desc="llama.cpp: loglikelihood")]

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [self._score(self.prefix, self._encode(r.args[0]))[0] for r in requests]

    def generate_until(self, requests):
        raise EvaluationError("generative lm-eval tasks are not run on a GGUF; use log-likelihood tasks")


def _scoring_hflm():
    """lm-eval's HFLM with its log-likelihood step done by the eval stage's own scorer
    (`likelihood_per_passage`: the decoder on padded batches, the head in fp32 on the scored tokens
    only), so a benchmark costs what eval's perplexity pass costs per token. Requests are encoded,
    truncated and ordered by HFLM itself, and generative tasks run through HFLM unchanged."""
    from lm_eval.models.huggingface import HFLM

    class ScoringHFLM(HFLM):
        head_path = "auto"  # checked once per model, on the first request

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self.head_path == "auto":
                self.head_path = separate_head(self.model)
            seqs = []
            for _, context, continuation in requests:
                # HFLM's own checks; run_benchmarks turns a failed one into a clear error
                assert context and continuation and len(continuation) <= self.max_length
                whole = (context + continuation)[-(self.max_length + 1) :]  # HFLM's left truncation
                scored = min(len(continuation), len(whole) - 1)
                seqs.append(Sequence(whole, mask=[0] * (len(whole) - scored) + [1] * scored))
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            size = override_bs or self.batch_size
            per = likelihood_per_passage(self.model, seqs, size, pad, "lm-eval", self.head_path)
            answers = []
            for (key, _, _), nll, hits, count in zip(
                requests, per["nll"], per["hits"], per["count"], strict=True
            ):
                answer = (-float(nll), bool(hits == count))  # (log-likelihood, greedy)
                if key is not None:  # lm-eval's request cache, as HFLM fills it
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                answers.append(answer)
            return answers

    return ScoringHFLM


def run_benchmarks(model, tokenizer, cfg: DictConfig, manager=None) -> dict:
    """Every task of eval.benchmarks on one model (transformers, or a GGUFModel in llama.cpp) →
    {task: {metric: {"value", "stderr", "low", "high"}}} with 95% intervals."""
    if hasattr(model, "logits") and hasattr(model, "llm"):  # lmtune.export.llamacpp.GGUFModel
        lm = LlamaCppLM(model, tokenizer)
    else:
        # log-softmax in fp32: in a bf16 model's own dtype a passage's summed log-likelihood is rounded
        # to bf16's 8 bits (-150.0 for two different models), and variants could not be told apart
        lm = _scoring_hflm()(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=cfg.eval.batch_size,
            device=str(model.device),
            softmax_dtype=torch.float32,
        )
    try:
        out = _evaluate(lm, cfg, manager)
    except AssertionError:  # lm-eval's HFLM asserts that every continuation fits the context
        raise EvaluationError(
            f"eval.benchmarks: a document of {', '.join(cfg.eval.benchmarks)} is longer than the model's "
            "context; drop that task or use a model with a longer context"
        ) from None
    scores = {}
    for task, result in out["results"].items():
        scores[task] = {}
        for key, value in result.items():
            metric, _, filter_name = key.partition(",")
            if metric not in out["higher_is_better"][task] or not isinstance(value, int | float):
                continue  # stderr entries, counts (sample_len), aliases
            stderr = result.get(f"{metric}_stderr,{filter_name}")
            entry = {"value": float(value), "higher_is_better": out["higher_is_better"][task].get(metric)}
            if isinstance(stderr, int | float):
                entry |= {
                    "stderr": float(stderr),
                    "low": value - 1.96 * stderr,
                    "high": value + 1.96 * stderr,
                }
            elif metric == "bits_per_byte":  # lm-eval gives no stderr for a ratio: bootstrap the passages
                entry |= _bits_per_byte_interval(out["samples"][task], cfg.eval.bootstrap_resamples, cfg.seed)
            scores[task][metric] = entry
    return scores


def _evaluate(lm, cfg: DictConfig, manager) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(cfg.eval.benchmarks),
        task_manager=manager or task_manager(cfg),
        limit=cfg.eval.benchmark_limit,
        bootstrap_iters=cfg.eval.bootstrap_resamples,
        log_samples=True,  # per-passage numbers: the interval of bits per byte
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )


def _bits_per_byte_interval(samples: list[dict], resamples: int, seed: int) -> dict:
    """95% bootstrap interval of sum(-loglikelihood) / sum(bytes) / ln 2 over passages."""
    pairs = np.array([s["bits_per_byte"] for s in samples], dtype=np.float64)  # (loglikelihood, bytes)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pairs), size=(resamples, len(pairs)))
    values = -pairs[picks, 0].sum(1) / pairs[picks, 1].sum(1) / math.log(2)
    low, high = np.percentile(values, [2.5, 97.5])
    return {"low": float(low), "high": float(high)}


def reference_model(benchmarks: dict[str, dict]) -> str:
    """What deltas are taken against: the base where it ran the benchmarks, else the first model
    that did (the merged model, under eval.benchmark_models' default)."""
    return "base" if "base" in benchmarks else next(iter(benchmarks))


def with_deltas(benchmarks: dict[str, dict]) -> dict:
    """Each model's value minus the reference model's (`reference_model`), per task and metric."""
    reference = reference_model(benchmarks)
    for tasks in benchmarks.values():
        for task, metrics in tasks.items():
            for metric, entry in metrics.items():
                entry["delta"] = entry["value"] - benchmarks[reference][task][metric]["value"]
                entry["delta_vs"] = reference
    return benchmarks


def gate_failures(benchmarks: dict[str, dict], gate) -> list[str]:
    """eval.gate: which post-training forms of the merged model lose more than gate.max_drop on
    gate.task / gate.metric against the merged model (a loss: lower where higher is better)."""
    if gate is None:
        return []
    merged = benchmarks.get("merged", {}).get(gate.task, {}).get(gate.metric)
    if merged is None:
        raise EvaluationError(
            f"eval.gate: no '{gate.metric}' of task '{gate.task}' on the merged model; the gate's task "
            "must be in eval.benchmarks and the metric one it reports"
        )
    failures = []
    for name, tasks in benchmarks.items():
        if not name.startswith("merged_"):
            continue
        entry = tasks[gate.task][gate.metric]
        lost = (
            merged["value"] - entry["value"]
            if entry["higher_is_better"]
            else entry["value"] - merged["value"]
        )
        if lost > gate.max_drop:
            failures.append(
                f"{name} loses {lost:.4f} {gate.metric} on {gate.task} against merged "
                f"({entry['value']:.4f} vs {merged['value']:.4f}; eval.gate.max_drop={gate.max_drop})"
            )
    return failures


def markdown(benchmarks: dict[str, dict]) -> list[str]:
    """The benchmark rows of eval.md: one per (task, metric, model), with interval and delta."""
    reference = reference_model(benchmarks)
    lines = [
        "## Benchmarks (lm-evaluation-harness)",
        "",
        f"| task | metric | model | value | 95% interval | vs {reference} |",
        "|---|---|---|---|---|---|",
    ]
    for name, tasks in benchmarks.items():
        for task, metrics in tasks.items():
            for metric, e in metrics.items():
                interval = f"[{e['low']:.4f}, {e['high']:.4f}]" if "low" in e else "-"
                delta = "-" if name == reference else f"{e['delta']:+.4f}"
                lines.append(f"| {task} | {metric} | {name} | {e['value']:.4f} | {interval} | {delta} |")
    return [*lines, ""]
