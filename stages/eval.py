"""Score every model on the test split → metrics/eval.json and metrics/eval.md.

    python stages/eval.py [key=value ...]    # or: make eval (reruns only this stage)

Models: the base in 16/32-bit; the quantized base alone and with the adapter exactly as trained
(4/8-bit runs); the merged model; the merged model after post-training quantization (a GGUF runs
in llama.cpp, not in transformers). Metrics
(README, "Evaluation"): perplexity and token accuracy on every learned token of the test split;
for text, ROUGE-1/2/L and BLEU of greedy continuations of each passage's first eval.prompt_tokens
tokens against the next eval.reference_tokens; for conversations, exact match and answer F1 (and
ROUGE, BLEU) of greedy answers to the test questions. Each with a 95% bootstrap interval, and each
model's delta vs the base with its paired interval. Then lm-evaluation-harness tasks
(eval.benchmarks; lmtune.evaluate.benchmarks) on the models of eval.benchmark_models (by default
the merged and the quantized model), and eval.gate over them: the stage fails, after writing its
results, when the quantized model loses too much against the merged one.
"""

import sys
import time
from pathlib import Path

import numpy as np

from lmtune.artifacts import write_json, write_text
from lmtune.checkpoint import load_tokenizer
from lmtune.config import MIN_EVAL_EXAMPLES
from lmtune.data.sequences import read_prompts, read_sequences
from lmtune.evaluate import benchmarks as lm_eval_tasks
from lmtune.evaluate.forms import model_loaders
from lmtune.evaluate.generation import greedy_continuations, sampled_completions
from lmtune.evaluate.scores import (
    LIKELIHOOD_METRICS,
    TASK_METRICS,
    EvaluationError,
    bootstrap,
    eval_markdown,
    generation_pairs,
    generation_per_example,
    likelihood_per_passage,
    metric_functions,
    preference_functions,
)
from lmtune.export.llamacpp import GGUFModel, check_decodes
from lmtune.export.quantize import GGUF_FILE
from lmtune.model.hardware import device, free_device_memory, resolve_dtype
from lmtune.pipeline.runner import run_stage
from lmtune.rl.report import task_functions


def generation_set(cfg, tokenizer, seqs) -> tuple[list[list[int]], list[list[str]]]:
    """(prompt token ids, accepted reference texts) of the examples generation metrics use."""
    e = cfg.eval
    if cfg.data.format == "chat":
        questions = read_prompts(cfg.paths.processed, "test")[: e.generation_examples]
        return [q["prompt_ids"] for q in questions], [q["references"] for q in questions]
    # text: passages long enough to hold a prompt and at least one reference token
    pairs = generation_pairs(seqs, e.prompt_tokens, e.reference_tokens)[: e.generation_examples]
    return [p for p, _ in pairs], [[tokenizer.decode(r, skip_special_tokens=True)] for _, r in pairs]


def run(cfg) -> dict:
    e, paths, dtype = cfg.eval, cfg.paths, resolve_dtype(cfg.eval.dtype)
    tokenizer = load_tokenizer(paths.base)
    seqs = read_sequences(paths.processed, "test")[: e.max_examples]
    prompts, references = generation_set(cfg, tokenizer, seqs)
    if not prompts:
        raise EvaluationError(
            "no test example to generate from: every test passage is shorter than eval.prompt_tokens="
            f"{e.prompt_tokens}; lower it, or add data"
        )
    manager = lm_eval_tasks.task_manager(cfg) if e.benchmarks else None
    lm_eval_tasks.check_tasks(cfg, manager)  # before any model loads
    if (gguf := Path(paths.quantized) / GGUF_FILE).is_file():
        check_decodes(gguf)  # a llama.cpp that crashes on this file is named now, not after hours
    pairs = held_out_pairs(cfg)
    task_rows, task_prompts, task = task_questions(cfg, tokenizer)  # before any model loads
    n_ctx = context_length(cfg, seqs + pairs, prompts)
    if task_prompts:  # a GGUF's context holds the task's questions and their answers too
        n_ctx = max(n_ctx, max(map(len, task_prompts)) + cfg.rl.max_completion_length)
    loaders = model_loaders(cfg, dtype, n_ctx)
    functions, examples, speed, benchmarks, pair_scores, roles = {}, {}, {}, {}, {}, {}
    for name, (role, load) in loaders.items():
        benchmark_with = manager if e.benchmarks and role in e.benchmark_models else None
        likelihood, continuations, speed[name], results, pair_scores[name], answers = score(
            name, load, seqs, prompts, tokenizer, cfg, benchmark_with, pairs, task_prompts
        )
        roles[role] = name
        if results is not None:
            benchmarks[name] = results
        predictions = [tokenizer.decode(c, skip_special_tokens=True) for c in continuations]
        functions[name] = answer_functions(cfg, likelihood, continuations, predictions, references)
        examples[name] = predictions[:3]
        if task_rows:
            greedy_ids, sampled_ids = answers
            functions[name] |= task_functions(
                task_rows, tokenizer.batch_decode(greedy_ids, skip_special_tokens=True),
                [len(a) for a in greedy_ids], tokenizer.batch_decode(sampled_ids, skip_special_tokens=True),
                e.task_samples, *task,
            )  # fmt: skip
    sizes = {m: len(seqs) if m in LIKELIHOOD_METRICS else len(prompts) for m in functions["base"]}
    if pairs:
        sizes |= add_preference_functions(cfg, functions, pair_scores, roles)
    if task_rows:
        sizes |= dict.fromkeys(functions["base"].keys() & TASK_METRICS, len(task_rows))
        if "task_pass_at_k" in sizes:
            sizes["task_pass_at_k"] = min(len(task_rows), e.generation_examples)
    scores = bootstrap(functions, sizes, "base", e.bootstrap_resamples, cfg.seed)
    settings = settings_of(cfg, seqs, prompts, dtype)
    if pairs:
        settings["held_out_preference_pairs"] = len(pairs) // 2
    if task_rows:
        settings["task"] = {
            "name": cfg.rl.task,
            "questions": len(task_rows),
            "sampled_questions": sizes.get("task_pass_at_k", 0),
            "samples_per_question": e.task_samples,
            "starting_policy": add_start_deltas(cfg, scores, functions, sizes, roles),
        }
    write_results(cfg, scores, settings, references, examples, speed, benchmarks)
    if failures := lm_eval_tasks.gate_failures(benchmarks, e.gate):  # after the results are written
        raise EvaluationError(
            "eval.gate failed: " + "; ".join(failures) + f". The results are in {paths.metrics}/eval.json"
        )
    return {name: {m: round(v["value"], 4) for m, v in per.items()} for name, per in scores.items()}


def context_length(cfg, seqs, prompts) -> int:
    """The context llama.cpp opens for a GGUF: the longest test passage or prompt and its reference,
    and room for a benchmark's documents, which may be longer, when the GGUF runs them."""
    n_ctx = max(max(map(len, seqs)), max(map(len, prompts)) + cfg.eval.reference_tokens)
    if cfg.eval.benchmarks and "quantized" in cfg.eval.benchmark_models:
        n_ctx = max(n_ctx, 2048)
    return n_ctx


def answer_functions(cfg, likelihood, continuations, predictions, references) -> dict:
    """One model's metric functions of the test split (lmtune.evaluate.scores.metric_functions),
    and on chat data the answers' mean length: preference tuning tends to lengthen them."""
    chat = cfg.data.format == "chat"
    generation = generation_per_example(predictions, references, chat, cfg.eval.metrics_source)
    functions = metric_functions(likelihood, generation)
    if chat:
        lengths = np.array([len(c) for c in continuations], dtype=float)
        functions["answer_tokens"] = lambda idx: float(lengths[idx].mean())
    return functions


def add_preference_functions(cfg, functions: dict, pair_scores: dict, roles: dict) -> dict[str, int]:
    """Every model's metrics on the held-out pairs, the implicit reward against the starting policy
    as this stage scored it (the SFT adapter, or the base as training saw it); returns their sizes."""
    start = roles["sft"] if cfg.align.start == "sft" else roles.get("quantized_base", "base")
    for name in functions:
        added = preference_functions(pair_scores[name], pair_scores[start])
        functions[name] |= added
    return dict.fromkeys(added, len(pair_scores[start]["nll"]) // 2)


def add_start_deltas(cfg, scores: dict, functions: dict, sizes: dict, roles: dict) -> str:
    """After RL: every form's task metrics against the policy RL started from (its adapter as
    trained, or the base as training saw it), paired on the same resamples, beside the deltas
    against the base; returns that form's name."""
    if cfg.rl.start == "tuned":
        start = roles["aligned" if cfg.align.method != "none" else "sft"]
    else:
        start = roles.get("quantized_base", "base")
    if start == "base":  # the deltas against it are there already
        return start
    task = {m: n for m, n in sizes.items() if m in TASK_METRICS}
    against = bootstrap(
        {name: {m: fns[m] for m in task} for name, fns in functions.items()},
        task, start, cfg.eval.bootstrap_resamples, cfg.seed,
    )  # fmt: skip
    for name, per in against.items():
        for metric, entry in per.items():
            if "delta" in entry:
                scores[name][metric] |= {
                    "delta_vs_start": entry["delta"],
                    "delta_vs_start_ci95": entry["delta_ci95"],
                }
    return start


def held_out_pairs(cfg) -> list:
    """After preference tuning, the held-out pairs' responses (chosen, rejected, ...) as the reference
    stage rendered them; none otherwise, or when the held-out split is KTO's unpaired examples."""
    if cfg.align.method == "none":
        return []
    from lmtune.align.sources import read_split

    items, reference = read_split(cfg.paths.pairs, "test")
    return [] if "label" in reference else [seq for pair in items for seq in pair]


def score(name, load, seqs, prompts, tokenizer, cfg, benchmark_with, pairs=(), task_prompts=()):
    """Load one model, score the likelihood of every test passage (and of the held-out preference
    pairs' responses), generate greedily from every prompt (and answer the RL task's held-out
    questions), run the benchmarks (when `benchmark_with` holds lm-eval's task manager); release it.
    Returns (likelihoods, continuations, its speed figures, its benchmark results or None, the
    pairs' likelihoods, the task's answers)."""
    e, results, pair_likelihood = cfg.eval, None, None
    began = time.perf_counter()
    model = load()
    speed = {"load_seconds": time.perf_counter() - began}
    gguf = isinstance(model, GGUFModel)  # scored in llama.cpp, where a GGUF's users run it
    speed["runtime"] = "llama.cpp" if gguf else "transformers"
    if gguf:
        likelihood = model.likelihood_per_passage(seqs, desc=name)
        if pairs:
            pair_likelihood = model.likelihood_per_passage(pairs, desc=f"{name}, held-out pairs")
    else:
        likelihood = likelihood_per_passage(model, seqs, e.batch_size, tokenizer.pad_token_id, desc=name)
        if pairs:
            pair_likelihood = likelihood_per_passage(
                model, pairs, e.batch_size, tokenizer.pad_token_id, desc=f"{name}, held-out pairs"
            )
    if benchmark_with is not None:
        began = time.perf_counter()
        results = lm_eval_tasks.run_benchmarks(model, tokenizer, cfg, benchmark_with)
        speed["benchmark_seconds"] = time.perf_counter() - began
    began = time.perf_counter()
    continuations = greedy(model, prompts, e.reference_tokens, tokenizer, e.batch_size, name)
    speed["generated_tokens_per_second"] = sum(map(len, continuations)) / (time.perf_counter() - began)
    answers = greedy(
        model, task_prompts, cfg.rl.max_completion_length, tokenizer, e.batch_size, f"{name}, task"
    )
    # k samples cost k greedy answers: on the first eval.generation_examples questions, as the
    # other generation metrics
    samples = sampled(model, task_prompts[: e.generation_examples], cfg, tokenizer, f"{name}, task")
    answers = (answers, samples)
    if gguf:
        model.close()
    del model
    if (left := free_device_memory()) is not None:  # the next model starts on an empty card
        speed["gpu_gib_left_after_release"] = left
    return likelihood, continuations, speed, results, pair_likelihood, answers


def greedy(model, prompts, max_new_tokens: int, tokenizer, batch_size: int, desc: str) -> list[list[int]]:
    """Greedy continuations of token-id prompts, in llama.cpp for a GGUF, else in transformers."""
    if not prompts:
        return []
    if isinstance(model, GGUFModel):
        return model.greedy_continuations(prompts, max_new_tokens, tokenizer.eos_token_id, desc)
    return greedy_continuations(
        model, prompts, max_new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size, desc=desc
    )


def sampled(model, prompts, cfg, tokenizer, desc: str) -> list[list[int]]:
    """eval.task_samples answers to each prompt (prompt-major), sampled as RL samples them
    (rl.temperature, rl.top_p, rl.max_completion_length), eval.batch_size sequences at a time, each
    batch under its own seed drawn from the config's `seed`; EOS not kept. A GGUF samples in
    llama.cpp, with its own sampler."""
    k = cfg.eval.task_samples
    if not prompts or not k:
        return []
    if isinstance(model, GGUFModel):
        return model.sampled_continuations(
            prompts, k, cfg.rl.max_completion_length, tokenizer.eos_token_id, cfg.rl, cfg.seed, desc
        )
    from tqdm.auto import tqdm

    per_call = max(1, cfg.eval.batch_size // k)
    answers = []
    for start in tqdm(range(0, len(prompts), per_call), desc=f"{desc}: sample", unit="batch", leave=False):
        chunk = prompts[start : start + per_call]
        completions = sampled_completions(model, chunk, k, cfg.rl, tokenizer, cfg.seed + start)
        answers += [a[:-1] if a and a[-1] == tokenizer.eos_token_id else a for a in completions]
    return answers


def task_questions(cfg, tokenizer) -> tuple[list[dict], list[list[int]], tuple | None]:
    """After RL, the task's held-out questions as the rl stage asked them, and how an answer is
    scored: the task's scorer and rl.rewards' functions (each resolved now, before any model loads)."""
    if cfg.rl.method == "none":
        return [], [], None
    from lmtune.rl.rewards import reward_functions, task_reward
    from lmtune.rl.tasks import load_task, prompt_ids

    task, _, rows = load_task(cfg.rl, cfg.seed)
    if len(rows) < MIN_EVAL_EXAMPLES:
        raise EvaluationError(
            f"rl.test_prompts={cfg.rl.test_prompts} gives {len(rows)} held-out questions of {cfg.rl.task}; "
            f"eval's bootstrap intervals need at least {MIN_EVAL_EXAMPLES}: raise rl.test_prompts"
        )
    scorers = task_reward(task, cfg.rl.answer), reward_functions(cfg.rl.rewards, task, cfg.rl.answer)
    return rows, [prompt_ids(r["question"], cfg.rl, tokenizer) for r in rows], scorers


def settings_of(cfg, seqs, prompts, dtype) -> dict:
    """How the models were scored, written beside the scores."""
    e = cfg.eval
    return {
        "split": "test",
        "format": cfg.data.format,
        "passages": len(seqs),
        "generation_examples": len(prompts),
        "max_length": cfg.data.max_length,
        "prompt_tokens": e.prompt_tokens,
        "reference_tokens": e.reference_tokens,
        "decoding": "greedy",
        "bootstrap_resamples": e.bootstrap_resamples,
        "dtype": str(dtype).replace("torch.", ""),
        "tokens_scored": int(sum(len(s) - 1 if s.mask is None else sum(s.mask[1:]) for s in seqs)),
        "batch_size": e.batch_size,
        "device": str(device()),
    }


def write_results(cfg, scores, settings, references, examples, speed, benchmarks) -> None:
    """metrics/eval.json (scores, speed, settings, benchmarks with deltas) and metrics/eval.md."""
    metrics = {"models": scores, "speed": speed, "settings": settings}
    if benchmarks:
        metrics["benchmarks"] = lm_eval_tasks.with_deltas(benchmarks)
        settings["benchmarks"] = {
            "tasks": list(cfg.eval.benchmarks),
            "limit": cfg.eval.benchmark_limit,
            "models": list(benchmarks),
            "engine": "lm-eval",
        }
    write_json(Path(cfg.paths.metrics) / "eval.json", metrics)
    firsts = [refs[0] for refs in references[:3]]
    page = eval_markdown(scores, settings, firsts, examples, speed)
    if benchmarks:
        page += "\n" + "\n".join(lm_eval_tasks.markdown(benchmarks))
    write_text(Path(cfg.paths.metrics) / "eval.md", page)


if __name__ == "__main__":
    sys.exit(run_stage(run))
