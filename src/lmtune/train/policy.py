"""The policy a post-training method (preference tuning, RL) starts from: the quantized base as
training sees it, with an adapter read from a folder or a fresh LoRA, on the family's exact path."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lmtune.model.load import load_for_training
from lmtune.model.lora import add_lora
from lmtune.train.exact_path import choose_exact_path
from lmtune.train.kernels import register_varlen_attention


def start_policy(cfg: DictConfig, adapter: str | Path | None, trainable: bool = True):
    """(model, packed): the quantized base with the adapter in `adapter` (None: a fresh LoRA of
    cfg.lora, seeded), and whether sequences train in packed rows (packing on and the varlen
    kernel exact for this family), the attention set to match."""
    from peft import PeftModel

    base = load_for_training(cfg.paths.base, cfg.quant, gradient_checkpointing=False)
    if adapter is not None:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)
    else:
        model = add_lora(base, cfg.lora, cfg.seed)
    settled, attention, _ = choose_exact_path(model, cfg)
    packed = bool(settled.train.packing) and settled.train.attention == "varlen"
    model.get_base_model().set_attn_implementation(
        register_varlen_attention() if packed else attention or "sdpa"
    )
    return model, packed
