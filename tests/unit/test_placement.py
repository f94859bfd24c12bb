"""Where big models go on a GPU machine, decided before loading (checked here with a stand-in card)."""

import pytest
import torch

from lmtune.model import hardware
from lmtune.model.hardware import free_device_memory, placement, weights_gib
from lmtune.model.load import load_full


def test_weights_size_is_read_from_the_safetensors_headers(tiny_base):
    model = load_full(tiny_base, torch.float32)
    # tied embeddings are stored once, as parameters() counts them
    expected = sum(p.numel() for p in model.parameters()) * 2 / 2**30
    assert abs(weights_gib(tiny_base, torch.bfloat16) - expected) < 1e-9


def test_merge_goes_to_the_cpu_when_the_base_does_not_fit_the_card(tiny_base, monkeypatch):
    """A 7B base in fp32 (27 GB) on a 24 GB card merges on the CPU; on an 80 GB card, on the card."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "weights_gib", lambda path, dtype: 27.0 * dtype.itemsize / 4)
    for free_gib, fp32, bf16 in [(22, "cpu", "cuda"), (78, "cuda", "cuda"), (12, "cpu", "cpu")]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free_gib: (f * 2**30, 80 * 2**30))
        assert placement(tiny_base, torch.float32, "auto").type == fp32, free_gib
        assert placement(tiny_base, torch.bfloat16, "auto").type == bf16, free_gib
        assert placement(tiny_base, torch.float32, "cpu").type == "cpu"
        assert placement(tiny_base, torch.float32, "cuda").type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without a GPU")
def test_without_a_card_everything_stays_on_the_cpu(tiny_base):
    assert placement(tiny_base, torch.float32, "cuda").type == "cpu"
    assert free_device_memory() is None
