"""Quantizing the merged model (torchao, bitsandbytes; GGUF in test_gguf.py) and int4 QAT: what cannot work is refused first;
every output loads with plain transformers and generates; QAT converts to what it trained on."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmtune.checkpoint import ModelError
from lmtune.config import ConfigError
from lmtune.export.quantize import check_method, load_quantized, quantize
from lmtune.model.load import load_full
from lmtune.model.qat import prepare_qat
from lmtune.pipeline.params import compose_conf

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_unknown_methods_and_impossible_qat_combinations_fail_before_work():
    with pytest.raises(ModelError, match="unknown; choose one of int8_weight_only"):
        check_method("int3")
    with pytest.raises(ConfigError, match=r"quant\.qat=int4 with quant\.bits=4.*quant=qat_int4"):
        compose_conf(["quant=qat_int4", "quant.bits=4"], conf_dir=CONF)
    with pytest.raises(ConfigError, match=r"quantize\.method=int8_dynamic with quant\.qat=int4"):
        compose_conf(["quant=qat_int4", "quantize.method=int8_dynamic"], conf_dir=CONF)
    with pytest.raises(ConfigError, match=r"quant\.qat='int8'"):
        compose_conf(["quant=qat_int4", "quant.qat=int8"], conf_dir=CONF)
    cfg = compose_conf(["quant=qat_int4"], conf_dir=CONF)  # the switch alone picks the int4 conversion
    assert cfg.quant.bits == 16 and cfg.quantize.method == "int4_weight_only"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "method, tolerance",
    [("int8_weight_only", 0.05), ("int8_dynamic", 0.05), ("int4_weight_only", 0.3), ("bnb_nf4", 0.3)],
)
def test_quantized_model_loads_with_plain_transformers_and_stays_close(
    tiny_base, tiny_seqs, tmp_path, method, tolerance
):
    seqs, tokenizer = tiny_seqs
    metrics = quantize(tiny_base, tmp_path, method, torch.float32)
    assert metrics["method"] == method
    assert list(tmp_path.glob("*.safetensors"))
    reference = load_full(tiny_base, torch.float32)
    model = load_quantized(tmp_path, torch.float32)
    ids = torch.tensor([seqs[0][:20]])
    expected, got = _logits(reference, ids), _logits(model, ids)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == 24
    assert (got - expected).abs().max() < tolerance * expected.abs().max()
    assert not torch.equal(got, expected)  # it really is quantized


def test_qat_converted_logits_equal_the_fake_quantized_logits(tiny_base, tiny_seqs, tmp_path):
    """What QAT trains on (fake-quantized int4) is what the quantize stage delivers (real int4)."""
    seqs, _ = tiny_seqs
    ids = torch.tensor([seqs[2][:24]])
    fake = prepare_qat(load_full(tiny_base, torch.float32), group_size=32)
    assert sum(type(m).__name__ == "FakeQuantizedLinear" for m in fake.modules()) == 2 * 7  # all but lm_head
    quantize(tiny_base, tmp_path, "int4_weight_only", torch.float32, group_size=32)
    converted = load_quantized(tmp_path, torch.float32)
    expected, got = _logits(fake, ids), _logits(converted, ids)
    assert torch.allclose(got, expected, atol=1e-4)
    plain = _logits(load_full(tiny_base, torch.float32), ids)
    assert (plain - expected).abs().max() > 100 * (got - expected).abs().max()  # int4 rounding is visible


def test_qat_training_learns_through_the_fake_quantized_base(tiny_base, tiny_seqs, tmp_path):
    from lmtune.model.load import load_for_training
    from lmtune.model.lora import add_lora
    from lmtune.train.loop import train

    seqs, tokenizer = tiny_seqs
    cfg = OmegaConf.merge(
        compose_conf(["experiment=smoke", "quant=qat_int4"], conf_dir=CONF),
        {"train": {"max_steps": 4, "eval_every": 2}},
    )
    model = add_lora(load_for_training(tiny_base, cfg.quant, False), cfg.lora, cfg.seed)
    assert any(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())
    result = train(model, seqs, seqs[:8], cfg, tmp_path, tokenizer.pad_token_id)
    assert result["lora_matrices_unchanged"] == 0
    assert result["train_curve"][-1]["loss"] < result["train_curve"][0]["loss"]
