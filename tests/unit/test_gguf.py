"""GGUF export checked in a real llama.cpp runtime (llama-cpp-python), on a Llama-2-style model: a tiny
random Llama with a SentencePiece tokenizer (byte fallback, BOS) trained in-process. The real default
model (SmolLM2, byte-level BPE) goes through the pipeline to a Q4_K_M file in tests/pipeline."""

import pytest
import torch
from conftest import ROOT, TEXTS
from omegaconf import OmegaConf

from lmtune.checkpoint import ModelError, load_tokenizer
from lmtune.config import Config, ConfigError
from lmtune.evaluate.scores import likelihood_per_passage
from lmtune.export.gguf import _turn_wrappers, export_gguf, tensor_types
from lmtune.export.llamacpp import GGUFModel
from lmtune.export.quantize import GGUF_FILE
from lmtune.model.load import load_full
from lmtune.pipeline.params import compose_conf

# How far each file may be from transformers' fp32 model on the same token ids: logits (share of the
# largest logit) and test perplexity (relative). f16 rounds; q8_0 and Q4_K_M lose precision.
TOLERANCE = {"f16": (0.01, 0.002), "q8_0": (0.05, 0.01), "q4_k_m": (0.3, 0.1)}


@pytest.fixture(scope="module")
def llama2_style(tmp_path_factory):
    """models/base of a tiny Llama-2-style model: SentencePiece BPE, byte fallback, <s> first."""
    from lmtune.base.build import build_base

    cfg = compose_conf(["experiment=smoke", "model.tiny.tokenizer=sentencepiece"], conf_dir=ROOT / "conf")
    out = tmp_path_factory.mktemp("llama2_style")
    build_base(OmegaConf.merge(OmegaConf.structured(Config), cfg), out, TEXTS * 3)
    return out


@pytest.fixture(scope="module")
def exported(llama2_style, tmp_path_factory):
    files = {}
    for kind in TOLERANCE:
        files[kind] = tmp_path_factory.mktemp(kind) / GGUF_FILE
        export_gguf(llama2_style, files[kind], kind)
    return files


def test_the_tokenizer_is_llama2_style_and_keeps_its_sentencepiece_model(llama2_style):
    tokenizer = load_tokenizer(llama2_style)
    ids = tokenizer("Tomorrow, and tomorrow ☃")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token == "</s>"
    assert "<0xE2>" in tokenizer.convert_ids_to_tokens(ids)  # the snowman is spelled in bytes
    assert (llama2_style / "tokenizer.model").is_file()  # the scores llama.cpp's SentencePiece needs


def test_llama_cpp_tokenizes_as_sentencepiece_and_transformers_do(llama2_style, exported):
    """Without tokenizer.model, llama.cpp's converter gives every piece the same score and the GGUF
    tokenizes differently (seen: "or" became "o" + "r"). Leading spaces are where transformers'
    SentencePiece conversion itself parts from sentencepiece; llama.cpp follows sentencepiece."""
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(llama2_style / "tokenizer.model"))
    tokenizer = load_tokenizer(llama2_style)
    model = GGUFModel(exported["f16"], 256)
    try:
        for text in [*TEXTS[:6], "digits 12345, ☃ bytes,\n\n  spaces", "  leading spaces"]:
            ours = model.llm.tokenize(text.encode(), add_bos=True, special=False)
            assert ours == [1, *reference.encode(text)], text
            if not text.startswith(" "):
                assert ours == tokenizer(text)["input_ids"], text
        assert model.llm.token_bos() == tokenizer.bos_token_id
        assert model.llm.token_eos() == tokenizer.eos_token_id
        assert model.llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    finally:
        model.close()


@pytest.mark.parametrize("kind", list(TOLERANCE))
def test_llama_cpp_runs_each_export_close_to_transformers(llama2_style, exported, kind):
    logit_tolerance, perplexity_tolerance = TOLERANCE[kind]
    tokenizer = load_tokenizer(llama2_style)
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS[:6]]
    reference = load_full(llama2_style, torch.float32)
    model = GGUFModel(exported[kind], 256)
    try:
        ids = seqs[0]
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0]
        got = model.logits(ids)
        assert (got - expected).abs().max() < logit_tolerance * expected.abs().max()
        ours = model.likelihood_per_passage(seqs)
        theirs = likelihood_per_passage(reference, seqs, 2, tokenizer.pad_token_id)
        assert (ours["count"] == theirs["count"]).all()
        ppl = lambda s: torch.tensor(s["nll"].sum() / s["count"].sum()).exp()  # noqa: E731
        assert abs(ppl(ours) / ppl(theirs) - 1) < perplexity_tolerance
        if kind == "f16":  # greedy decoding: the same first tokens as transformers
            prompt = seqs[1][:12]
            greedy = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
            assert model.greedy_continuations([prompt], 8, eos_id=-1) == [greedy[0, 12:].tolist()]
    finally:
        model.close()


def test_sampled_answers_are_seeded_differ_from_each_other_and_stop_at_their_length(llama2_style, exported):
    from types import SimpleNamespace

    prompt = load_tokenizer(llama2_style)(TEXTS[1])["input_ids"][:12]
    hot = SimpleNamespace(temperature=1.5, top_p=1.0)
    model = GGUFModel(exported["f16"], 256)
    try:
        first = model.sampled_continuations([prompt, prompt[:6]], 4, 8, eos_id=-1, sampling=hot, seed=3)
        again = model.sampled_continuations([prompt, prompt[:6]], 4, 8, eos_id=-1, sampling=hot, seed=3)
        other = model.sampled_continuations([prompt, prompt[:6]], 4, 8, eos_id=-1, sampling=hot, seed=4)
    finally:
        model.close()
    assert first == again and first != other
    assert len(first) == 8 and all(len(a) == 8 for a in first)
    assert len({tuple(a) for a in first[:4]}) > 1  # each answer has its own seed


def test_q4_k_m_is_llama_cpps_own_k_quant_mix(exported):
    """Q4_K needs rows of 256: the tiny model's 128-wide rows make llama.cpp fall back (q5_0 and,
    for the sensitive tensors, q8_0); norms stay f32. Its file is the smallest."""
    types = tensor_types(exported["q4_k_m"])
    assert {"Q5_0", "F32"} <= set(types) and "F16" not in types
    sizes = {kind: path.stat().st_size for kind, path in exported.items()}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    assert not list(exported["q4_k_m"].parent.glob("*.tmp"))  # the f16 in between is gone


def test_the_modelfile_renders_conversations_as_the_chat_template_does(llama2_style, exported):
    tokenizer = load_tokenizer(llama2_style)
    wrappers = _turn_wrappers(tokenizer)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who?"},
        {"role": "assistant", "content": "Puck."},
        {"role": "user", "content": "Where?"},
    ]
    as_ollama = "".join(wrappers[m["role"]][0] + m["content"] + wrappers[m["role"]][1] for m in conversation)
    assert as_ollama + wrappers["generation"][0] == tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    text = (exported["q8_0"].parent / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{GGUF_FILE}\n") and 'PARAMETER stop "</s>"' in text
    assert '{{- if eq .Role "user" }}<|user|>\n{{ .Content }}</s>\n{{ end }}' in text


def test_a_template_that_is_not_a_sequence_of_turns_is_left_to_the_gguf(llama2_style, tmp_path):
    """Llama-2's own template puts the system prompt inside the first [INST]: no Go template is
    guessed for it; Ollama then reads the one inside the GGUF."""
    from lmtune.export.gguf import modelfile

    tokenizer = load_tokenizer(llama2_style)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set s = m['content'] %}"
        "{% elif m['role'] == 'user' %}[INST] {{ s }} {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    tokenizer.save_pretrained(tmp_path)
    for name in ("config.json", "tokenizer.model"):
        (tmp_path / name).write_bytes((llama2_style / name).read_bytes())
    assert _turn_wrappers(tokenizer) is None
    text = modelfile(tmp_path, GGUF_FILE)
    assert "TEMPLATE" not in text and "read from the GGUF" in text and 'PARAMETER stop "</s>"' in text


def test_gguf_needs_a_tokenizer_llama_cpp_knows_said_at_composition():
    with pytest.raises(ConfigError, match=r"quantize\.method=gguf_q4_k_m with model\.tiny\.tokenizer=bpe"):
        compose_conf(["experiment=smoke", "quantize=gguf_q4_k_m"], conf_dir=ROOT / "conf")
    cfg = compose_conf(
        ["experiment=smoke", "quantize=gguf_q4_k_m", "model.tiny.tokenizer=sentencepiece"],
        conf_dir=ROOT / "conf",
    )
    assert cfg.quantize.method == "gguf_q4_k_m"


# families llama.cpp's converter turns into a GGUF, each checked in llama.cpp against transformers
# (on the Llama-2-style SentencePiece tokenizer; families whose converter wants a byte-level BPE
# with a known pre-tokenizer, OLMo-2, StableLM, StarCoder2, need such a tokenizer, not a new family)
GGUF_FAMILIES = {
    "Qwen2Config": {},
    "Qwen3Config": {"head_dim": 16},
    "Phi3Config": {},
    "GemmaConfig": {"head_dim": 16},
    "MixtralConfig": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "GraniteConfig": {"logits_scaling": 2.0},
    "MistralConfig": {},
}


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_export_of_other_families_runs_in_llama_cpp_as_transformers_does(llama2_style, tmp_path, family):
    import json
    import shutil

    import transformers

    tokenizer = load_tokenizer(llama2_style)
    small = {
        "vocab_size": json.loads((llama2_style / "config.json").read_text())["vocab_size"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    config = getattr(transformers, family)(**small, **GGUF_FAMILIES[family])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    shutil.copy(llama2_style / "tokenizer.model", tmp_path / "merged")  # the SentencePiece model itself
    metrics = export_gguf(tmp_path / "merged", tmp_path / GGUF_FILE, "f16")
    assert metrics["tensor_types"]
    ids = tokenizer(TEXTS[0])["input_ids"]
    gguf = GGUFModel(tmp_path / GGUF_FILE, 256)
    try:
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0]
        assert (gguf.logits(ids) - expected).abs().max() < TOLERANCE["f16"][0] * expected.abs().max()
    finally:
        gguf.close()


def test_a_family_the_converter_does_not_know_is_refused_in_its_words(llama2_style, tmp_path):
    import json
    import shutil

    folder = tmp_path / "unknown"
    shutil.copytree(llama2_style, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(
        ModelError, match=r"llama.cpp's converter refused (.|\n)*Model NoSuchForCausalLM is not supported"
    ):
        export_gguf(folder, tmp_path / GGUF_FILE, "f16")


# llama.cpp's build on this host: quantized files decode (in a child process, so that a crash in
# one of its CPU kernels fails a test instead of killing the test run), and the build never has
# ggml's AMX backend, whose q8_0/q4_K kernels crash on AMX CPUs.


@pytest.fixture(scope="module")
def k_quant_files(tmp_path_factory):
    """A tiny Llama whose rows are 256 wide, so that Q4_K_M really holds Q4_K (and Q6_K) blocks,
    exported to q8_0 and q4_k_m."""
    from lmtune.base.build import build_base

    overrides = ["experiment=smoke", "model.tiny.tokenizer=sentencepiece", "model.tiny.hidden_size=256"]
    cfg = compose_conf([*overrides, "model.tiny.intermediate_size=512"], conf_dir=ROOT / "conf")
    base = tmp_path_factory.mktemp("k_quants")
    build_base(OmegaConf.merge(OmegaConf.structured(Config), cfg), base, TEXTS * 3)
    files = {kind: base.parent / f"{base.name}.{kind}.gguf" for kind in ("q8_0", "q4_k_m")}
    for kind, path in files.items():
        export_gguf(base, path, kind)
    return files


def test_q8_0_and_q4_k_m_files_decode_in_llama_cpp_on_this_cpu(k_quant_files):
    from lmtune.export.llamacpp import check_decodes

    assert "Q8_0" in tensor_types(k_quant_files["q8_0"])
    assert "Q4_K" in tensor_types(k_quant_files["q4_k_m"])
    for path in k_quant_files.values():
        check_decodes(path)  # a crash raises, naming it


def test_llama_cpp_is_built_for_this_cpu_without_the_amx_backend():
    import json
    import sys
    from pathlib import Path

    from lmtune.export.llamacpp import system_info
    from lmtune.provenance import llama_cpp_build

    info = system_info()
    assert "AVX2 = 1" in info or "AVX = 1" in info or "NEON = 1" in info, info  # the host's own SIMD
    assert "AMX_INT8 = 1" not in info, info
    flags = json.loads((Path(sys.prefix) / "llama-cpp-build.json").read_text())
    assert {"-mno-amx-int8", "-mno-amx-tile"} <= set(flags["cflags"].split())
    assert "-DGGML_NATIVE=ON" in flags["cmake_args"]
    assert llama_cpp_build()["build_key"] == flags["build_key"]


def test_a_crash_inside_llama_cpp_is_one_line_naming_the_cause(k_quant_files, monkeypatch):
    import sys

    from lmtune.export import llamacpp

    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(llamacpp, "_probe_command", lambda path: [sys.executable, "-c", crash])
    llamacpp._decodes.cache_clear()
    with pytest.raises(
        llamacpp.LlamaCppError, match=r"llama\.cpp crashed \(SIGSEGV\) decoding .*q8_0\.gguf: "
    ):
        llamacpp.check_decodes(k_quant_files["q8_0"])
    monkeypatch.setattr(llamacpp, "system_info", lambda: "CPU : AVX512 = 1 | AMX_INT8 = 1 |")
    llamacpp._decodes.cache_clear()
    with pytest.raises(
        llamacpp.LlamaCppError, match=r"AMX backend.*rm -f \.venv/\.llama-build && make setup"
    ):
        llamacpp.check_decodes(k_quant_files["q8_0"])
    llamacpp._decodes.cache_clear()


def test_a_file_llama_cpp_cannot_load_is_named(tmp_path):
    from lmtune.export.llamacpp import LlamaCppError, check_decodes

    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LlamaCppError, match=r"llama\.cpp cannot run .*model\.gguf: .*dvc repro quantize"):
        check_decodes(broken)
