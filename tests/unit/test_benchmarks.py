"""Benchmarks through lm-evaluation-harness (a real lm-eval run over lmtune's shipped tasks) on the
tiny model: the wiring is proven by computing one task's number directly."""

import math

import pandas as pd
import pytest
import torch
from conftest import ROOT, TEXTS
from omegaconf import OmegaConf

from lmtune.checkpoint import load_tokenizer
from lmtune.evaluate import benchmarks
from lmtune.evaluate.scores import EvaluationError
from lmtune.export.gguf import export_gguf
from lmtune.export.llamacpp import GGUFModel
from lmtune.model.load import load_full
from lmtune.pipeline.params import compose_conf


@pytest.fixture(scope="module")
def manager():
    """lm-eval's whole task index (about 10 s: it reads every task YAML lm-eval ships), as built
    when eval.benchmarks names one of lm-eval's own tasks."""
    return benchmarks.task_manager(
        compose_conf(["eval.benchmarks=[hellaswag]", "eval.gate=null"], conf_dir=ROOT / "conf")
    )


def test_the_task_index_reads_lm_evals_own_tasks_only_when_one_is_named(tmp_path, manager):
    own = benchmarks.task_manager(cfg_for(tmp_path, "eval.benchmarks=[lmtune_chatterbot_mc]"))
    assert set(own.all_tasks) >= set(benchmarks.SHIPPED) and "hellaswag" not in own.all_tasks
    assert {"hellaswag", *benchmarks.SHIPPED} <= set(
        manager.all_tasks
    )  # built for eval.benchmarks=[hellaswag]


def cfg_for(tmp_path, *overrides):
    processed = tmp_path / "processed"
    processed.mkdir(exist_ok=True)
    pd.DataFrame({"text": TEXTS[:6]}).to_parquet(processed / "test.parquet")
    return compose_conf(
        ["experiment=smoke", f"paths.processed={processed}", "eval.bootstrap_resamples=50", *overrides],
        conf_dir=ROOT / "conf",
    )


def direct_bits_per_byte(model, tokenizer, texts) -> float:
    """What lmtune_test_bpb measures, by hand: each passage after one start token (BOS, or EOS
    where the tokenizer has none), every token's NLL, over the passages' UTF-8 bytes."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    nll, size = 0.0, 0
    for text in texts:
        ids = [start, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        size += len(text.encode("utf-8"))
    return nll / size / math.log(2)


def test_lm_eval_bits_per_byte_equals_a_direct_computation(tiny_base, tmp_path):
    cfg = cfg_for(tmp_path, "eval.benchmarks=[lmtune_test_bpb]")
    tokenizer, model = load_tokenizer(tiny_base), load_full(tiny_base, torch.float32)
    manager = benchmarks.task_manager(cfg)
    scores = benchmarks.run_benchmarks(model, tokenizer, cfg, manager)["lmtune_test_bpb"]
    assert scores["bits_per_byte"]["value"] == pytest.approx(
        direct_bits_per_byte(model, tokenizer, TEXTS[:6]), rel=1e-4
    )
    assert (
        scores["bits_per_byte"]["low"] <= scores["bits_per_byte"]["value"] <= scores["bits_per_byte"]["high"]
    )
    assert scores["bits_per_byte"]["higher_is_better"] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lmtunes_scorer_gives_lm_eval_the_log_likelihoods_hflm_computes(tiny_base, dtype):
    """The benchmarks' log-likelihood step is eval's own scorer: per request the same log-likelihood
    and greedy flag as lm-eval's HFLM, left truncation at the model's context included."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer, model = load_tokenizer(tiny_base), load_full(tiny_base, dtype)
    pairs = [
        ("Question: who speaks?\nAnswer:", " HAMLET"),
        ("To be, or", " not to be"),
        (TEXTS[2] * 40, " day"),
    ]
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
    ]
    settings = {"pretrained": model, "tokenizer": tokenizer, "batch_size": 2, "softmax_dtype": torch.float32}
    theirs = HFLM(**settings).loglikelihood(requests)
    ours = benchmarks._scoring_hflm()(**settings).loglikelihood(requests)
    assert len(tokenizer(pairs[2][0])["input_ids"]) > model.config.max_position_embeddings  # truncated
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for (mine, greedy), (reference, their_greedy) in zip(ours, theirs, strict=True):
        assert mine == pytest.approx(reference, rel=tolerance) and greedy == their_greedy


def test_a_gguf_in_llama_cpp_scores_the_tasks_as_transformers_does(tmp_path):
    """LlamaCppLM encodes requests as lm-eval's HFLM does: an f16 export gives the same numbers."""
    from lmtune.base.build import build_base
    from lmtune.config import Config

    base = tmp_path / "base"
    base.mkdir()
    smoke = compose_conf(  # room for chatterbot's longer answers in a small vocabulary's tokens
        ["experiment=smoke", "model.tiny.tokenizer=sentencepiece", "model.tiny.max_position_embeddings=2048"],
        conf_dir=ROOT / "conf",
    )
    build_base(OmegaConf.merge(OmegaConf.structured(Config), smoke), base, TEXTS * 3)
    export_gguf(base, tmp_path / "model.gguf", "f16")
    cfg = cfg_for(
        tmp_path, "eval.benchmarks=[lmtune_test_bpb,lmtune_chatterbot_mc]", "eval.benchmark_limit=12"
    )
    tokenizer, manager = load_tokenizer(base), benchmarks.task_manager(cfg)
    theirs = benchmarks.run_benchmarks(load_full(base, torch.float32), tokenizer, cfg, manager)
    gguf = GGUFModel(tmp_path / "model.gguf", 2048)
    try:
        ours = benchmarks.run_benchmarks(gguf, tokenizer, cfg, manager)
    finally:
        gguf.close()
    assert ours["lmtune_test_bpb"]["bits_per_byte"]["value"] == pytest.approx(
        theirs["lmtune_test_bpb"]["bits_per_byte"]["value"], rel=2e-3
    )  # f16 rounding
    assert (
        abs(ours["lmtune_chatterbot_mc"]["acc"]["value"] - theirs["lmtune_chatterbot_mc"]["acc"]["value"])
        <= 1 / 12
    )


def test_unknown_and_hub_tasks_fail_in_one_line_before_any_model_loads(manager, tmp_path):
    for tasks, said in (
        ("[hellaswg]", r"no lm-eval task 'hellaswg' \(did you mean hellaswag"),
        ("[hellaswag]", r"'hellaswag' reads its dataset from the Hugging Face hub, and HF_HUB_OFFLINE=1"),
        ("[mmlu]", r"'mmlu' reads its dataset from the Hugging Face hub"),  # a group: its tasks decide
    ):
        with pytest.raises(EvaluationError, match=said):
            benchmarks.check_tasks(cfg_for(tmp_path, f"eval.benchmarks={tasks}"), manager)
    benchmarks.check_tasks(
        cfg_for(tmp_path, "eval.benchmarks=[lmtune_test_bpb,lmtune_chatterbot_mc]"), manager
    )
    with pytest.raises(EvaluationError, match=r"eval.task_dir=.*nowhere: no such folder"):
        benchmarks.check_tasks(
            cfg_for(tmp_path, "eval.benchmarks=[mine]", f"eval.task_dir={tmp_path / 'nowhere'}")
        )


def test_a_task_of_your_own_in_task_dir_runs(tiny_base, tmp_path):
    mine = tmp_path / "tasks"
    mine.mkdir()
    data = tmp_path / "lines.jsonl"
    data.write_text("".join(f'{{"text": "{t.splitlines()[1]}"}}\n' for t in TEXTS[:6]))
    (mine / "mine.yaml").write_text(
        f"task: my_lines\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
    )
    cfg = cfg_for(tmp_path, "eval.benchmarks=[my_lines]", f"eval.task_dir={mine}")
    benchmarks.check_tasks(cfg)  # local files: no hub needed
    tokenizer, model = load_tokenizer(tiny_base), load_full(tiny_base, torch.float32)
    scores = benchmarks.run_benchmarks(model, tokenizer, cfg)["my_lines"]["bits_per_byte"]["value"]
    assert scores == pytest.approx(
        direct_bits_per_byte(model, tokenizer, [t.splitlines()[1] for t in TEXTS[:6]]), rel=1e-4
    )


def test_the_gate_fails_a_quantized_form_that_loses_too_much_against_merged():
    def entry(value, higher=True):
        return {"value": value, "higher_is_better": higher}

    scores = {
        "base": {"t": {"acc": entry(0.50), "bits_per_byte": entry(2.0, False)}},
        "merged": {"t": {"acc": entry(0.60), "bits_per_byte": entry(1.5, False)}},
        "merged_gguf_q4_k_m": {"t": {"acc": entry(0.55), "bits_per_byte": entry(1.52, False)}},
    }
    gate = lambda metric, drop: OmegaConf.create({"task": "t", "metric": metric, "max_drop": drop})  # noqa: E731
    assert benchmarks.gate_failures(scores, gate("acc", 0.1)) == []
    (failure,) = benchmarks.gate_failures(scores, gate("acc", 0.02))
    assert failure.startswith("merged_gguf_q4_k_m loses 0.0500 acc on t against merged")
    assert benchmarks.gate_failures(scores, gate("bits_per_byte", 0.05)) == []  # lower is better here
    assert len(benchmarks.gate_failures(scores, gate("bits_per_byte", 0.01))) == 1
    with pytest.raises(EvaluationError, match=r"no 'f1' of task 't' on the merged model"):
        benchmarks.gate_failures(scores, gate("f1", 0.1))
    rows = benchmarks.markdown(benchmarks.with_deltas(scores))
    assert "| t | acc | merged_gguf_q4_k_m | 0.5500 | - | +0.0500 |" in rows
    assert rows[2] == "| task | metric | model | value | 95% interval | vs base |"
    del scores["base"]  # eval.benchmark_models' default: the merged and quantized models only
    rows = benchmarks.markdown(benchmarks.with_deltas(scores))
    assert rows[2] == "| task | metric | model | value | 95% interval | vs merged |"
    assert "| t | acc | merged_gguf_q4_k_m | 0.5500 | - | -0.0500 |" in rows


def test_a_document_longer_than_the_context_is_one_clear_error(tiny_base, tmp_path):
    mine = tmp_path / "tasks"
    mine.mkdir()
    data = tmp_path / "long.jsonl"
    data.write_text('{"q": "Which?", "choices": ["short", "' + "word " * 2000 + '"], "label": 0}\n')
    (mine / "long.yaml").write_text(
        f"task: long_choices\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    cfg = cfg_for(tmp_path, "eval.benchmarks=[long_choices]", f"eval.task_dir={mine}")
    with pytest.raises(
        EvaluationError, match=r"a document of long_choices is longer than the model's context"
    ):
        benchmarks.run_benchmarks(load_full(tiny_base, torch.float32), load_tokenizer(tiny_base), cfg)
