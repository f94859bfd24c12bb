"""Loading models/base: quantized and frozen for training, in full for merge, evaluation and
generation, or with its adapter unmerged."""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from lmtune.checkpoint import ModelError
from lmtune.model.hardware import device, resolve_dtype

# Subclasses of torch.nn.Linear in transformers that compute exactly what it computes (Falcon's:
# input @ weight.T + bias). bitsandbytes replaces torch.nn.Linear by exact type, and torchao's
# tensors do not survive their forward, so lmtune builds these models with plain Linear layers.
SAME_AS_LINEAR = {"transformers.models.falcon.modeling_falcon": "FalconLinear"}


@contextmanager
def _plain_linear_layers():
    swapped = []
    for module_name, name in SAME_AS_LINEAR.items():
        module = importlib.import_module(module_name)
        swapped.append((module, name, getattr(module, name)))
        setattr(module, name, torch.nn.Linear)
    try:
        yield
    finally:
        for module, name, original in swapped:
            setattr(module, name, original)


def from_pretrained(path: str | Path, **kwargs):
    """transformers' AutoModelForCausalLM.from_pretrained, safetensors only, with the layers of
    SAME_AS_LINEAR built as torch.nn.Linear (same weights, same numbers), so that quantization
    reaches them."""
    from transformers import AutoModelForCausalLM

    with _plain_linear_layers():
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)


def load_full(path: str | Path, dtype: torch.dtype, on: torch.device | None = None):
    """The model in plain 16/32-bit, safetensors only, no remote code, on `on` (default: device())."""
    return from_pretrained(path, dtype=dtype).to(on or device()).eval()


def quantization_config(quant: DictConfig, compute_dtype: torch.dtype, shardable: bool = False):
    """bitsandbytes' config for the base; `shardable` (FSDP-QLoRA) stores the packed 4-bit weights
    in the compute dtype, so FSDP can shard them like the other 16-bit tensors."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if shardable else torch.uint8,
        )
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def keep_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    bitsandbytes 0.49/0.50 on CPUs with AVX512-BF16: the first eval-mode or no-grad forward
    repacks the weights into a layout with no backward, after which the LoRA gradients of the
    early layers are silently zero. A mid-training validation must never stop learning.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def left_unquantized(model) -> tuple[int, list[str]]:
    """(decoder layers bitsandbytes quantized, the decoder's weights it left in 16 bits, named with
    why). bitsandbytes replaces exactly torch.nn.Linear: a subclass of it (other than those
    SAME_AS_LINEAR makes plain) and mixture-of-experts weights held as 3-D tensors (Mixtral,
    Qwen3-MoE, GPT-OSS) stay as they are."""
    import bitsandbytes as bnb

    quantized, left = 0, []
    for name, module in model.get_decoder().named_modules():
        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            quantized += 1
        elif isinstance(module, torch.nn.Linear):
            left.append(f"{name} ({type(module).__name__})")
        elif any(p.dim() == 3 for p in module.parameters(recurse=False)):
            left.append(f"{name} (experts as 3-D tensors)")
    return quantized, left


def check_quantized(model, bits: int, path: str | Path) -> None:
    """quant.bits=4 or 8 means the decoder is quantized: none of it is an error (training would
    silently run on the 16-bit base); a part left in 16 bits is said once."""
    quantized, left = left_unquantized(model)
    if not quantized:
        raise ModelError(
            f"quant.bits={bits}: bitsandbytes quantized no layer of {path}'s decoder ({', '.join(left[:3])}"
            f"{', ...' if len(left) > 3 else ''}: it replaces torch.nn.Linear only), so training would run on "
            "the 16-bit base. Say so with quant=none (LoRA on the 16-bit base)"
        )
    if left:
        print(
            f"note: quant.bits={bits}: {len(left)} of the decoder's weights stay in 16 bits, e.g. "
            f"{'; '.join(left[:2])} (bitsandbytes replaces torch.nn.Linear only); {quantized} layers are {bits}-bit",
            flush=True,
        )


def set_recompute(model, every_n_layers: int | None, offload: bool = False) -> None:
    """transformers' activation checkpointing on every n-th decoder layer (None: off); the others
    keep their activations. `offload` holds the checkpointed inputs in pinned host memory."""
    if every_n_layers is None:
        model.activation_checkpointing_disable()
        return
    model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers, offload)


def load_for_training(
    path: str | Path,
    quant: DictConfig,
    gradient_checkpointing: bool | str,
    shardable: bool = False,
    every_n_layers: int = 1,
    offload: bool = False,
):
    """The frozen base as configured (4-bit, 8-bit or plain), ready for LoRA (and for FSDP to
    shard). gradient_checkpointing=auto starts with every layer recomputed: training measures
    what fits before the first step (lmtune.train.loop.choose_recompute)."""
    compute_dtype = resolve_dtype(quant.bnb_4bit_compute_dtype)
    model = from_pretrained(
        path,
        dtype=compute_dtype,
        quantization_config=quantization_config(quant, compute_dtype, shardable),
        device_map={"": str(device())},
    )
    keep_4bit_trainable(model)
    if quant.bits < 16:
        check_quantized(model, quant.bits, path)
    if quant.get("qat"):
        from lmtune.model.qat import prepare_qat

        prepare_qat(model, quant.qat_group_size)
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        set_recompute(model, 1 if gradient_checkpointing == "auto" else every_n_layers, offload)
    model.config.use_cache = False
    return model


def load_base_with_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    dtype: torch.dtype,
    quant: DictConfig | None = None,
    on: torch.device | None = None,
):
    """Base + unmerged adapter: the base in `dtype` on `on` (default: device()), or quantized as in
    training when `quant`."""
    from peft import PeftModel

    if quant is not None and (quant.bits < 16 or quant.get("qat")):
        base = load_for_training(base_dir, quant, gradient_checkpointing=False)
        base.config.use_cache = True
    else:
        base = load_full(base_dir, dtype, on)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
