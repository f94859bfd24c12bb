"""GGUF export of the merged model for llama.cpp users.

The `gguf` package supplies the writer, llama.cpp's tensor names and the tokenizer readers; what is
left here is the Llama layout: hyperparameters, and the q/k row order llama.cpp's rotary embedding
expects. transformers reads the file back (it is how the base stage loads the shipped SmolLM2),
which is how the tests check an export.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from lmtune.modeling import ModelError

TYPES = ("f32", "f16", "bf16", "q8_0")  # gguf.quants can write these from Python


def _rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF stores each head's rotary pairs as two halves; llama.cpp interleaves them."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def export_gguf(model_dir: str | Path, out_file: Path, tensor_type: str) -> dict:
    """models/merged (a Llama in safetensors) → one .gguf file with weights in `tensor_type`."""
    import gguf
    from safetensors.torch import load_file

    if tensor_type not in TYPES:
        raise ModelError(f"quantize.gguf_type={tensor_type}: choose one of {', '.join(TYPES)}")
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ModelError(
            f"{model_dir}/config.json: GGUF export supports Llama models, not {config.get('model_type')}"
        )
    began = time.perf_counter()
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    qtype = gguf.GGMLQuantizationType[tensor_type.upper()]

    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(
        getattr(gguf.LlamaFileType, f"MOSTLY_{tensor_type.upper()}", gguf.LlamaFileType.ALL_F32)
    )

    vocab = gguf.vocab.BpeVocab(model_dir)  # reads tokenizer.json
    tokens, _, token_types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(file))
    for name, tensor in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"{model_dir}: tensor {name} has no GGUF name for a Llama model")
        data = tensor.to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            data = _rotary_rows(data, heads)
        elif name.endswith("k_proj.weight"):
            data = _rotary_rows(data, kv_heads)
        if data.ndim == 1 or tensor_type == "f32":  # norms stay f32, as llama.cpp's converter keeps them
            writer.add_tensor(gguf_name, data)
        elif tensor_type == "f16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            # handed over as bytes: the writer derives the element shape from the type
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return {"format": f"GGUF ({tensor_type}, llama.cpp)", "gguf_file": out_file.name,
            "gguf_seconds": time.perf_counter() - began}  # fmt: skip
