"""GGUF export of the merged model for llama.cpp and Ollama, with llama.cpp's own tools.

The converter is llama.cpp's `convert_hf_to_gguf.py` and the K-quants come from llama.cpp's quantizer
(`llama_model_quantize` through llama-cpp-python), both from the one llama.cpp release that
llama-cpp-python vendors: `make setup` builds the runtime from PyPI's source package and unpacks that
package's converter into .venv/share/llama.cpp. The converter knows what a hand-written writer got
wrong: SentencePiece vocabularies (byte fallback, Llama-2), the BPE pre-tokenizer key, the chat template
and the special token ids. Next to the GGUF goes an Ollama Modelfile (template and stop tokens).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lmtune.checkpoint import ModelError

CONVERTER = Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # llama.cpp's quantizer, from an f16 file
TYPES = CONVERTER_TYPES + tuple(K_QUANTS)


def convert(model_dir: Path, out_file: Path, outtype: str) -> None:
    """Run llama.cpp's converter on a transformers checkpoint; its own error lines if it refuses."""
    if not CONVERTER.is_file():
        raise ModelError(f"{CONVERTER} not found: llama.cpp's converter is unpacked by `make setup`")
    command = [sys.executable, CONVERTER, model_dir, "--outfile", out_file, "--outtype", outtype]
    done = subprocess.run(command, capture_output=True, text=True)  # it uses the gguf-py beside it
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()][-6:]
        raise ModelError(f"llama.cpp's converter refused {model_dir}:\n  " + "\n  ".join(lines))


def k_quantize(f16_file: Path, out_file: Path, kind: str) -> None:
    """f16 GGUF → a K-quant mix (q4_k_m: 4-bit K blocks, 6-bit for the most sensitive tensors)."""
    import logging

    import llama_cpp

    # llama.cpp logs every tensor, and warns for each one whose rows do not split into K blocks of
    # 256 (it falls back to another type; `tensor_types` reports what it chose). llama-cpp-python
    # maps ggml's warnings to ERROR, so only CRITICAL quiets them.
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.CRITICAL)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[kind])
    params.nthread = os.cpu_count() or 1
    try:
        failed = llama_cpp.llama_model_quantize(
            str(f16_file).encode(), str(out_file).encode(), ctypes.byref(params)
        )
    finally:
        log.setLevel(level)
    if failed:
        raise ModelError(f"llama.cpp's quantizer failed on {f16_file} ({kind}, code {failed})")


def export_gguf(model_dir: str | Path, out_file: Path, tensor_type: str) -> dict:
    """models/merged (safetensors) → one .gguf file in `tensor_type`, and a Modelfile. Any family
    llama.cpp's converter knows; one it does not is refused with the converter's own words."""
    if tensor_type not in TYPES:
        raise ModelError(f"GGUF type {tensor_type}: choose one of {', '.join(TYPES)}")
    model_dir = Path(model_dir)
    began = time.perf_counter()
    if tensor_type in K_QUANTS:
        f16_file = out_file.with_suffix(".f16.tmp")
        try:
            convert(model_dir, f16_file, "f16")
            k_quantize(f16_file, out_file, tensor_type)
        finally:
            f16_file.unlink(missing_ok=True)
    else:
        convert(model_dir, out_file, tensor_type)
    (out_file.parent / "Modelfile").write_text(modelfile(model_dir, out_file.name))
    return {
        "format": f"GGUF ({tensor_type}, llama.cpp)",
        "gguf_file": out_file.name,
        "gguf_seconds": time.perf_counter() - began,
        "tensor_types": tensor_types(out_file),
    }


def tensor_types(gguf_file: Path) -> dict[str, int]:
    """How many tensors the file stores in each type ({"Q4_K": 150, "Q6_K": 30, "F32": 61})."""
    from collections import Counter

    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(gguf_file).tensors).most_common())


# --------------------------------------------------------------------------------------------
# Ollama


def _turn_wrappers(tokenizer) -> dict[str, tuple[str, str]] | None:
    """(text before, text after) a message of each role in the model's chat template, and the text
    that opens the reply, found by rendering a growing conversation of sentinels; None where the
    template is not a plain sequence of wrapped turns (Llama-2's [INST] folds the system prompt into
    the first user turn)."""
    messages = [{"role": r, "content": f"\x00{r}\x00"} for r in ("system", "user", "assistant")]
    try:
        wrappers, rendered = {}, ""
        for n, message in enumerate(messages, 1):
            text = tokenizer.apply_chat_template(messages[:n], tokenize=False)
            if not text.startswith(rendered) or text.count(message["content"]) != 1:
                return None
            before, _, after = text[len(rendered) :].partition(message["content"])
            wrappers[message["role"]], rendered = (before, after), text
        asked = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        upto_user = tokenizer.apply_chat_template(messages[:2], tokenize=False)
        if not asked.startswith(upto_user):
            return None
        wrappers["generation"] = (asked[len(upto_user) :], "")
        return wrappers
    except Exception:  # templates may raise on a conversation they do not accept
        return None


def modelfile(model_dir: Path, gguf_name: str) -> str:
    """An Ollama Modelfile: the GGUF, its chat template in Go-template form, and its stop tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stops = {tokenizer.eos_token}
    lines = [f"FROM ./{gguf_name}", ""]
    wrappers = _turn_wrappers(tokenizer) if tokenizer.chat_template else None
    if wrappers:
        stops |= {after.strip() for _, after in wrappers.values() if after.strip()}
        turns = "".join(
            f'{{{{- if eq .Role "{role}" }}}}{_go(before)}{{{{ .Content }}}}{_go(after)}{{{{ end }}}}'
            for role, (before, after) in wrappers.items()
            if role != "generation"
        )
        template = f"{{{{- range .Messages }}}}{turns}{{{{- end }}}}{_go(wrappers['generation'][0])}"
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ["# the chat template is read from the GGUF (tokenizer.chat_template)", ""]
    lines += [f'PARAMETER stop "{json.dumps(s)[1:-1]}"' for s in sorted(s for s in stops if s)]
    return "\n".join(lines) + "\n"


def _go(text: str) -> str:
    """Literal text inside a Go template (Ollama's TEMPLATE): braces would open an action."""
    return text.replace("{{", '{{ "{{" }}')
