"""Shipping what was trained, on the real default model (SmolLM2-135M, byte-level BPE): the pipeline
with quantize=gguf_q4_k_m (training cut to 3 steps), the GGUF run by llama.cpp, the merged model
registered in MLflow and loaded back by another process, and `make chat`'s program on stdin."""

import json
import re
import sys

import pytest
from repo_copy import copy_repo, free_port, sh

from lmtune.checkpoint import ModelError
from lmtune.export.gguf import export_gguf
from lmtune.export.llamacpp import GGUFModel

NAME = "smollm2_135m-shakespeare"  # the registered model's default name: MODEL-DATA
SHORT = [
    "quantize=gguf_q4_k_m",
    "train.max_steps=3",
    "train.warmup_steps=1",
    "train.eval_every=3",
    "data.max_samples=300",
    "data.max_length=128",
    "train.batch_size=4",
    "eval.max_examples=10",
    "eval.generation_examples=10",
    "eval.reference_tokens=8",
    "sample.max_new_tokens=16",
    "eval.benchmark_limit=20",  # the default benchmark and gate on merged and the GGUF, on a few questions
    "eval.gate.max_drop=1.0",  # Q4_K_M may lose a few of 20 answers: the gate runs, and passes
    "sample.num_prompts=2",
]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    dest = copy_repo(tmp_path_factory.mktemp("ship"))
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", *SHORT, cwd=dest)
    sh("dvc", "repro", cwd=dest)
    return dest


def test_the_default_pipeline_writes_a_q4_k_m_gguf_and_evaluate_runs_it_in_llama_cpp(shipped):
    quantized = json.loads((shipped / "metrics/quantize.json").read_text())
    assert quantized["method"] == "gguf_q4_k_m" and {"Q4_K", "Q6_K"} <= set(quantized["tensor_types"])
    assert quantized["size_ratio"] < 0.25  # fp32 merged → ~4.5 bits a weight
    scores = json.loads((shipped / "metrics/eval.json").read_text())
    gguf, merged = scores["models"]["merged_gguf_q4_k_m"], scores["models"]["merged"]
    assert scores["speed"]["merged_gguf_q4_k_m"]["runtime"] == "llama.cpp"
    assert scores["speed"]["merged_gguf_q4_k_m"]["generated_tokens_per_second"] > 0
    # measured 72.1 vs 69.0 (+4.4%): Q4_K_M costs a few percent; a layout or tokenizer error costs 10x
    assert abs(gguf["perplexity"]["value"] / merged["perplexity"]["value"] - 1) < 0.10
    assert "llama.cpp" in (shipped / "metrics/eval.md").read_text()
    # the default benchmark, on the merged model and on the GGUF in llama.cpp, and the gate over it
    assert set(scores["benchmarks"]) == {"merged", "merged_gguf_q4_k_m"}
    accuracy = scores["benchmarks"]["merged_gguf_q4_k_m"]["lmtune_chatterbot_mc"]["acc"]
    assert accuracy["delta_vs"] == "merged" and 0 <= accuracy["value"] <= 1


def test_llama_cpp_tokenizes_the_test_split_as_transformers_and_knows_the_chat_format(shipped):
    """SmolLM2's pre-tokenizer is one llama.cpp's converter recognises ("smollm"): without the key
    llama.cpp falls back to a default and warns that generation quality will be degraded."""
    import pandas as pd
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shipped / "models/merged")
    model = GGUFModel(shipped / "models/quantized/model.gguf", 512)
    try:
        assert model.llm.metadata["tokenizer.ggml.pre"] == "smollm"
        assert model.llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        assert model.llm.token_eos() == tokenizer.eos_token_id
        for text in pd.read_parquet(shipped / "data/processed/test.parquet")["text"]:  # each ends in EOS
            ids = model.llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = model.llm.create_chat_completion(
            [{"role": "user", "content": "Say one word."}], max_tokens=16, temperature=0.0
        )
        assert reply["choices"][0]["message"]["content"].strip()
    finally:
        model.close()
    modelfile = (shipped / "models/quantized/Modelfile").read_text()
    assert '{{- if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ end }}' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_an_f16_export_of_the_real_model_continues_prompts_as_transformers_does(shipped, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_gguf(shipped / "models/merged", tmp_path / "model.gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(shipped / "models/merged")
    reference = AutoModelForCausalLM.from_pretrained(shipped / "models/merged", dtype=torch.float32)
    model = GGUFModel(tmp_path / "model.gguf", 128)
    try:
        for prompt in ["ROMEO:\nBut soft, what light", "To be, or not to be, that is the question:"]:
            ids = tokenizer(prompt)["input_ids"]
            expected = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
            assert model.greedy_continuations([ids], 12, eos_id=-1) == [expected[0, len(ids) :].tolist()]
    finally:
        model.close()


def test_a_q8_0_export_of_the_real_model_scores_the_test_split_as_transformers_does(shipped, tmp_path):
    """Perplexity on the same token ids: llama.cpp with the q8_0 file vs transformers in fp32."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from lmtune.data.sequences import read_sequences
    from lmtune.evaluate.scores import likelihood_per_passage

    export_gguf(shipped / "models/merged", tmp_path / "model.gguf", "q8_0")
    seqs = read_sequences(shipped / "data/processed", "test")[:8]
    reference = AutoModelForCausalLM.from_pretrained(shipped / "models/merged", dtype=torch.float32)
    theirs = likelihood_per_passage(reference, seqs, 4, pad_id=0)
    model = GGUFModel(tmp_path / "model.gguf", max(map(len, seqs)))
    try:
        ours = model.likelihood_per_passage(seqs)
    finally:
        model.close()
    assert (ours["count"] == theirs["count"]).all() and ours["count"].sum() > 500
    perplexity = {
        k: np.exp(s["nll"].sum() / s["count"].sum()) for k, s in (("ours", ours), ("theirs", theirs))
    }
    assert abs(perplexity["ours"] / perplexity["theirs"] - 1) < 0.01, perplexity


def test_register_promote_and_a_process_in_another_folder_loads_the_champion(shipped, tmp_path):
    registered = sh(sys.executable, "-m", "lmtune.track.registry", "register", cwd=shipped)
    assert f"registered {NAME} version 1" in registered.stdout
    # offline, with the card and license given: no hub lookups, no library notices
    assert not [line for line in registered.stderr.splitlines() if "WARNING" in line], registered.stderr
    out = sh(sys.executable, "-m", "lmtune.track.registry", "promote", cwd=shipped).stdout
    assert f"models:/{NAME}@champion is version 1" in out
    uri = re.search(r"MLFLOW_TRACKING_URI=(\S+)", out)[1]  # the setting promote tells the user
    assert uri == f"sqlite:///{shipped / 'mlflow.db'}"
    load = (
        "import mlflow, sys;"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion');"
        "print(m.metadata.run_id); print(repr(m.predict(['To be, or not to be'], params={'max_new_tokens': 8})))"
    )
    elsewhere = tmp_path / "service"  # a service in another folder, outside the repository
    elsewhere.mkdir()
    loaded = sh(sys.executable, "-c", load, cwd=elsewhere, env={"MLFLOW_TRACKING_URI": uri})
    run_id, prediction = loaded.stdout.strip().splitlines()[-2:]
    assert list(elsewhere.iterdir()) == []  # no stray store made there
    assert prediction.startswith("['To be, or not to be") and len(prediction) > len("['To be, or not to be']")
    check = (
        "import mlflow; c = mlflow.MlflowClient('sqlite:///mlflow.db');"
        f"r = c.get_run('{run_id}'); print(r.data.tags['lmtune.params_hash'], r.data.params['quantize.method'],"
        " 'eval.merged.perplexity' in r.data.metrics)"
    )
    assert sh(sys.executable, "-c", check, cwd=shipped).stdout.split()[1:] == ["gguf_q4_k_m", "True"]
    card = (
        "import mlflow, pathlib; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
        f"p = pathlib.Path(mlflow.artifacts.download_artifacts('models:/{NAME}/1'));"
        "print((p / 'model_card_data.yaml').read_text())"
    )
    assert "license: apache-2.0" in sh(sys.executable, "-c", card, cwd=shipped).stdout  # the wheel's license


def test_register_refuses_a_merged_model_that_params_yaml_did_not_make(shipped):
    sh(
        sys.executable,
        "-m",
        "lmtune.pipeline.params",
        "--force",
        *SHORT,
        "merge.check_passages=2",
        cwd=shipped,
    )
    refused = sh(sys.executable, "-m", "lmtune.track.registry", "register", cwd=shipped, check=False)
    assert refused.returncode == 2 and "is not what params.yaml makes" in refused.stderr
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", *SHORT, cwd=shipped)


def test_chat_answers_a_prompt_given_on_standard_input(shipped):
    import subprocess

    chat = subprocess.run(
        [sys.executable, "-m", "lmtune.tools.chat", "--compare", "--max-new-tokens", "8"],
        input="Who are you?\n",
        capture_output=True,
        text=True,
        cwd=shipped,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    first, _, rest = chat.stdout.partition("\n")
    assert first == "you> Who are you?"
    _, *pairs = re.split(r"^(base|fine-tuned)> ", rest, flags=re.MULTILINE)  # answers may span lines
    answers = dict(zip(pairs[::2], pairs[1::2], strict=True))
    assert list(answers) == ["base", "fine-tuned"] and all(a.strip() for a in answers.values())


API_KEY = "lmtune-test-key"


@pytest.fixture(scope="module")
def served(shipped):
    """`make serve`'s program on a free port of 127.0.0.1, with an API key."""
    import os
    import subprocess
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "LMTUNE_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "lmtune.tools.serve", "--port", str(port)],
        cwd=shipped,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + 180
    while True:
        try:
            request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
            urllib.request.urlopen(request, timeout=5)
            break
        except OSError:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
    yield url, server
    server.terminate()
    server.wait(30)


def test_make_serve_answers_the_openai_client_as_llama_cpp_does_in_process(shipped, served):
    import concurrent.futures

    import llama_cpp
    import openai

    url, _ = served
    client = openai.OpenAI(base_url=url, api_key=API_KEY)
    greedy = {"temperature": 0, "max_tokens": 16}
    same = {"repeat_penalty": 1.0}  # llama.cpp's server and library differ in this default only
    question = [{"role": "user", "content": "Who art thou?"}]
    reply = client.chat.completions.create(model="smollm2_135m", messages=question, **greedy, extra_body=same)
    answer = reply.choices[0].message.content
    direct = llama_cpp.Llama(
        model_path=str(shipped / "models/quantized/model.gguf"),
        n_ctx=0,
        verbose=False,  # the model's, as served
    )
    alone = direct.create_chat_completion(messages=question, **greedy, **same)["choices"][0]["message"][
        "content"
    ]
    assert answer.strip() and answer == alone  # the same GGUF, chat template and greedy decoding
    # llama.cpp keeps the previous request's tokens and evaluates only what is new: a prompt
    # evaluated in pieces can differ in the last bits from one evaluated whole, enough to flip a
    # near-tie greedy token. So the in-process model replays the server's requests in order.
    streamed = client.chat.completions.create(
        model="smollm2_135m", messages=question, stream=True, **greedy, extra_body=same
    )
    again = direct.create_chat_completion(messages=question, **greedy, **same)["choices"][0]["message"][
        "content"
    ]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == again
    prompt = "To be, or not to be"
    text = (
        client.completions.create(model="smollm2_135m", prompt=prompt, **greedy, extra_body=same)
        .choices[0]
        .text
    )
    assert text.strip() and text == direct.create_completion(prompt, **greedy, **same)["choices"][0]["text"]

    def ask(i: int) -> str:
        asked = [{"role": "user", "content": f"Name a play, number {i}."}]
        return (
            client.chat.completions.create(model="smollm2_135m", messages=asked, max_tokens=8)
            .choices[0]
            .message.content
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(answers) == 8 and all(a.strip() for a in answers)
    with pytest.raises(openai.BadRequestError) as malformed:  # 400, naming the field, as OpenAI answers
        client.chat.completions.create(model="smollm2_135m", messages="not a list of turns")
    assert "messages must be a non-empty list" in str(malformed.value)
    assert client.chat.completions.create(model="smollm2_135m", messages=question, max_tokens=4).choices
    with pytest.raises(openai.NotFoundError, match="this server serves 'smollm2_135m'"):  # a typo is noticed
        client.chat.completions.create(model="smollm2-135m", messages=question)
    for wrong in ({"max_tokens": -1}, {"temperature": -1}, {"messages": []}):
        with pytest.raises(openai.BadRequestError, match=next(iter(wrong))):
            client.chat.completions.create(**{"model": "smollm2_135m", "messages": question, **wrong})
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=url, api_key="wrong").models.list()
    assert refused.value.status_code == 401


def test_make_serve_reads_what_clients_send_as_the_openai_api_does(served):
    """Each request of the table below through the OpenAI client: what the OpenAI API takes is
    answered, what it refuses gets 400 naming the parameter; nothing is a 500 or silently ignored."""
    import openai

    url, server = served
    client = openai.OpenAI(base_url=url, api_key=API_KEY)
    question = [{"role": "user", "content": "Who art thou?"}]
    greedy = {"model": "smollm2_135m", "temperature": 0, "max_tokens": 8}
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Who art "}, {"type": "text", "text": "thou?"}]}
    ]
    as_parts = client.chat.completions.create(messages=parts, **greedy)
    as_text = client.chat.completions.create(messages=question, **greedy)
    assert as_parts.choices[0].message.content.strip()
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens  # the same prompt, read as text
    chunks = list(
        client.chat.completions.create(
            messages=question, stream=True, stream_options={"include_usage": True}, **greedy
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    said = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert said.strip() and chunks[-1].usage.prompt_tokens == as_text.usage.prompt_tokens
    assert (
        chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    )
    assert 1 <= chunks[-1].usage.completion_tokens <= 8
    plain = list(client.chat.completions.create(messages=question, stream=True, **greedy))
    assert all(c.usage is None for c in plain)  # usage only when asked for
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    refused = [
        ({"messages": [{"role": "user", "content": None}]}, "messages", "content is null"),
        ({"messages": question, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"messages": question, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"messages": question, "tools": [weather]}, "tools", "no tool support"),
        ({"messages": question, "tools": [weather], "tool_choice": "auto"}, "tools", "no tool support"),
        (
            {"messages": [*question, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
            "messages",
            "tool_calls",
        ),
    ]
    for extra, param, words in refused:
        with pytest.raises(openai.BadRequestError, match=words) as error:
            client.chat.completions.create(**{**greedy, **extra})
        assert error.value.status_code == 400 and error.value.body["param"] == param, extra
    answered = [*question, {"role": "assistant", "content": None, "tool_calls": [call]}]
    answered.append({"role": "tool", "tool_call_id": "call_1", "content": "sunny"})
    with pytest.raises(openai.BadRequestError, match="no tool support"):  # its template cannot show them
        client.chat.completions.create(messages=answered, **greedy)
    assert client.chat.completions.create(messages=question, stop=["a", "b", "c", "d"], **greedy).choices
    assert server.poll() is None  # still serving


def test_lm_eval_against_make_serve_gets_the_eval_stages_benchmark_number(shipped, served, monkeypatch):
    """lm-eval's own OpenAI-API client (`local-completions`, token-id prompts with echo) runs
    lmtune's likelihood task against the server and gets what the eval stage got in-process."""
    import lm_eval

    from lmtune.config import load
    from lmtune.evaluate.benchmarks import task_manager

    url, _ = served
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.chdir(shipped)
    cfg = load()
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{url}/completions",
            "model": "smollm2_135m",
            "tokenizer": str(shipped / "models/merged"),
            "tokenizer_backend": "huggingface",
            "max_retries": 1,
        },
        tasks=["lmtune_chatterbot_mc"],
        limit=cfg.eval.benchmark_limit,
        task_manager=task_manager(cfg),
    )
    stage = json.loads((shipped / "metrics/eval.json").read_text())["benchmarks"]["merged_gguf_q4_k_m"]
    for metric in ("acc", "acc_norm"):
        served_value = out["results"]["lmtune_chatterbot_mc"][f"{metric},none"]
        assert served_value == pytest.approx(stage["lmtune_chatterbot_mc"][metric]["value"], abs=1e-9)


def test_serve_exports_merged_to_a_gguf_once_when_quantize_made_none(shipped, tmp_path):
    from lmtune.config import load
    from lmtune.tools.serve import gguf_to_serve

    cfg = load(root=shipped)
    cfg.quantize.method = "int8_weight_only"  # as the default pipeline: models/quantized holds no GGUF
    cfg.paths.merged = str(shipped / cfg.paths.merged)
    exported = tmp_path / "serve/model.q8_0.gguf"
    first = gguf_to_serve(cfg, exported)
    assert first == exported and first.read_bytes()[:4] == b"GGUF"
    made = first.stat().st_mtime_ns
    assert gguf_to_serve(cfg, exported).stat().st_mtime_ns == made  # not exported again
    with pytest.raises(ModelError, match=r"holds no model: run the pipeline first"):
        cfg.paths.merged = str(tmp_path / "nothing")
        gguf_to_serve(cfg, exported)
