"""Post-training quantization: what cannot run here is refused first; what runs loads and generates."""

import pytest
import torch

from lmtune.modeling import ModelError, load_full
from lmtune.quantization import check_method, load_quantized, quantize


def test_int4_without_a_gpu_and_unknown_methods_fail_before_work():
    if not torch.cuda.is_available():
        with pytest.raises(
            ModelError, match=r"int4_weight_only.*no CPU kernel.*int8_weight_only or int8_dynamic"
        ):
            check_method("int4_weight_only")
    with pytest.raises(ModelError, match="unknown"):
        check_method("int3")


@pytest.mark.parametrize("method", ["int8_weight_only", "int8_dynamic"])
def test_quantized_model_loads_with_plain_transformers_and_stays_close(
    tiny_base, tiny_seqs, tmp_path, method
):
    seqs, tokenizer = tiny_seqs
    quantize(tiny_base, tmp_path, method, torch.float32)
    assert list(tmp_path.glob("*.safetensors"))
    reference = load_full(tiny_base, torch.float32)
    model = load_quantized(tmp_path, torch.float32)
    ids = torch.tensor([seqs[0][:20]])
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
        generated = model.generate(
            ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert generated.shape[1] == 24
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert not torch.equal(got, expected)  # it really is quantized
