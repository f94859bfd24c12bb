"""int4 quantization-aware training (torchao): the base's linear layers fake-quantized as int4.

QAT trains for exactly the numerics that `quantize=int4_weight_only` writes afterwards (torchao's
IntxWeightOnly layout, one scale per group), so both take their config from `int4_weight_config`.
"""

from __future__ import annotations

import torch


def int4_weight_config(group_size: int):
    """int4 weights, one scale per `group_size` inputs: what QAT simulates and PTQ writes."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def is_quantized_linear(module: torch.nn.Module, name: str) -> bool:
    """The layers PTQ quantizes and QAT fake-quantizes: every linear layer but the output head,
    which shares its weight with the embedding in tied models."""
    return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")


def prepare_qat(model, group_size: int):
    """Fake-quantize the base's linear weights as int4 (torchao QAT): forward passes see the int4
    rounding, gradients pass straight through to the LoRA adapters added afterwards."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(int4_weight_config(group_size), step="prepare"), filter_fn=is_quantized_linear)
    return model
