"""LoRA adapters on the frozen base (peft): adding them, their trainable state, saving them."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from lmtune.checkpoint import ModelError

# the parts of a multimodal checkpoint (Gemma-3, Llava, Qwen-VL, ...) that are not its language model
NOT_THE_LANGUAGE_MODEL = r".*(vision_tower|vision_model|visual|multi_modal_projector|audio_tower)\..*"


def add_lora(model, lora: DictConfig, seed: int):
    from peft import LoraConfig, get_peft_model

    widths = [min(m.in_features, m.out_features) for m in model.modules() if hasattr(m, "in_features")]
    if widths and lora.r > max(widths):  # checked before peft allocates r x width matrices
        raise ModelError(
            f"lora.r={lora.r}: larger than every layer of this model (widest {max(widths)}); lower it"
        )
    torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same init
    target = lora.target_modules
    if not isinstance(target, str):
        target = list(target)
    # all-linear on a multimodal checkpoint adapts the language model only (text is what trains);
    # a list of module names is taken as given
    multimodal = target == "all-linear" and getattr(model.config, "vision_config", None) is not None
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=target,
        exclude_modules=NOT_THE_LANGUAGE_MODEL if multimodal else None,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_adapter(model, out_dir: str | Path) -> None:
    """Write the LoRA adapter. peft keeps target_modules as a set and writes it in hash order,
    which differs between processes; sorted, two equal trainings write byte-equal adapters."""
    for config in model.peft_config.values():
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
    model.save_pretrained(out_dir)


def lora_state(model) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable LoRA tensor (to check they all changed)."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
