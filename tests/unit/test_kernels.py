"""The hand-written training paths give what transformers' own paths give, in fp32."""

import pytest
import torch
import torch.nn.functional as F
from helpers import collate_packed
from omegaconf import OmegaConf

from lmtune.config import Config
from lmtune.model.load import load_for_training
from lmtune.model.lora import add_lora
from lmtune.train import kernels
from lmtune.train.kernels import chunked_cross_entropy, packed_segments, varlen_attention
from lmtune.train.step import micro_batch_loss, prepare_model


class Attention(torch.nn.Module):
    """What an attention function reads from its module."""

    is_causal = True
    num_key_value_groups = 3


def packed_position_ids(lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def block_causal_mask(position_ids, window=None):
    passage = (position_ids == 0).cumsum(1)
    length = position_ids.shape[1]
    same = passage[:, :, None] == passage[:, None, :]
    distance = torch.arange(length)[:, None] - torch.arange(length)
    seen = (distance >= 0) & (distance < window) if window else distance >= 0
    return (same & seen)[:, None]


def assert_varlen_equals_the_block_diagonal_mask(scaling: float, window=None, value_dim=16) -> None:
    """varlen_attention's output and q/k/v gradients against SDPA with a block-diagonal causal mask
    (and a sliding window): two packed rows, passages that straddle the 32-token groups, one of a
    single token, grouped query heads, value heads of their own size as in latent attention."""
    torch.manual_seed(0)
    position_ids = packed_position_ids([[40, 1, 23, 32], [96]])
    q, k = torch.randn(2, 6, 96, 16, requires_grad=True), torch.randn(2, 2, 96, 16, requires_grad=True)
    v = torch.randn(2, 2, 96, value_dim, requires_grad=True)
    grad = torch.randn(2, 96, 6, value_dim)

    segments = packed_segments(position_ids)
    out, _ = varlen_attention(Attention(), q, k, v, None, scaling=scaling, sliding_window=window, **segments)
    out.backward(grad)
    got = [out.detach(), q.grad, k.grad, v.grad]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(
        q, k, v, attn_mask=block_causal_mask(position_ids, window), scale=scaling, enable_gqa=True
    ).transpose(1, 2)
    ref.backward(grad)
    for mine, theirs in zip(got, [ref.detach(), q.grad, k.grad, v.grad], strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 5])
def test_varlen_attention_equals_a_block_diagonal_causal_mask_with_gradients(window):
    assert_varlen_equals_the_block_diagonal_mask(scaling=0.25, window=window, value_dim=8 if window else 16)


def reference_varlen_attn(
    q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=None, is_causal=None, enable_gqa=False
):
    """torch's varlen_attn contract in plain SDPA, one passage at a time: [T, H, D] in and out;
    window_size (left, 0) lets a token see itself and `left` tokens before it."""
    assert window_size is None or window_size[1] == 0 or is_causal is True  # causal, either way
    assert q.shape[-1] == k.shape[-1] == v.shape[-1]  # one head size: latent attention's v is padded
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    bounds = cu_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    assert enable_gqa or k.shape[1] == q.shape[1]  # without the flag, heads must be repeated
    left = window_size[0] if window_size and window_size[0] >= 0 else None

    def mask(n):
        distance = torch.arange(n)[:, None] - torch.arange(n)
        return (distance >= 0) & (distance <= left) if left is not None else distance >= 0

    pieces = [
        F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1),
            k[a:b].transpose(0, 1),
            v[a:b].transpose(0, 1),
            attn_mask=mask(b - a),
            scale=scale,
            enable_gqa=enable_gqa,
        ).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(pieces)


@pytest.mark.parametrize(
    "torch_has, window", [("window_size+gqa+scale", None), ("window_size+gqa+scale", 5), ("is_causal", None)]
)  # torch >= 2.11, torch 2.10
def test_the_cuda_path_hands_torch_varlen_kernel_all_passages_in_its_layout(monkeypatch, torch_has, window):
    """The card's path (one varlen_attn call for every passage) against the block-diagonal mask,
    with the kernel played by SDPA on the CPU: layouts, boundaries, causality, the sliding window,
    grouped heads, latent attention's own value size. The real kernel runs in
    tests/unit/test_gpu_training.py."""
    causal = {"window_size": (-1, 0)} if torch_has != "is_causal" else {"is_causal": True}
    options = {
        "fn": reference_varlen_attn,
        "causal": causal,
        "gqa": torch_has != "is_causal",
        "scale": torch_has != "is_causal",
    }
    monkeypatch.setattr(kernels, "_flash_varlen_options", lambda: options)
    monkeypatch.setattr(kernels, "use_flash_varlen", lambda query, *features: True)
    # scale 0.2, not the kernel's default 1/sqrt(16) = 0.25, so a lost scale would show
    assert_varlen_equals_the_block_diagonal_mask(scaling=0.2, window=window, value_dim=8 if window else 16)


def test_the_cuda_path_is_taken_only_for_what_torch_kernel_has(monkeypatch):
    monkeypatch.setattr(kernels, "_flash_varlen_options", lambda: {"causal": {"window_size": (-1, 0)}})
    card = torch.empty(1, 2, 4, 16, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type == "meta"))
    assert kernels.use_flash_varlen(card, None, None, None) and kernels.use_flash_varlen(
        card, 4096, None, None
    )
    assert not kernels.use_flash_varlen(card, None, 50.0, None)  # soft-capping: the per-passage path
    assert not kernels.use_flash_varlen(card, None, None, torch.zeros(2))  # sinks: the per-passage path
    assert not kernels.use_flash_varlen(card.float(), None, None, None)
    monkeypatch.setattr(
        kernels, "_flash_varlen_options", lambda: {"causal": {"is_causal": True}}
    )  # torch 2.10
    assert kernels.use_flash_varlen(card, None, None, None) and not kernels.use_flash_varlen(
        card, 4096, None, None
    )


def test_packed_segments_are_built_on_the_host_with_the_longest_as_a_number():
    segments = packed_segments(packed_position_ids([[3, 5], [2, 6]]))
    assert segments["cu_seq_lens_q"].tolist() == [0, 3, 8, 10, 16]
    assert segments["max_length_q"] == 6 and isinstance(segments["max_length_q"], int)


def test_varlen_attention_without_passage_boundaries_is_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    mask[1, :, :, 7:] = False  # padding
    mine, _ = varlen_attention(Attention(), q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(Attention(), q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize(
    "chunk, scale, softcap", [(7, 1.0, None), (64, 1.0, None), (7, 0.25, None), (7, 1.0, 2.0)]
)
def test_chunked_cross_entropy_equals_the_full_loss_and_its_gradient(chunk, scale, softcap):
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    labels = torch.randint(0, 50, (3, 20))
    labels[0, :5] = -100  # unscored positions
    labels[2, 11:] = -100

    mine = chunked_cross_entropy(hidden, weight, labels, chunk, scale=scale, softcap=softcap)
    (2 * mine).backward()
    got = hidden.grad
    hidden.grad = None
    logits = (hidden @ weight.T) * scale
    if softcap:  # as Gemma-2's head; logits of about +-3 (up to +-10) against a cap of 2: it bites
        logits = torch.tanh(logits / softcap) * softcap
    theirs = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    (2 * theirs).backward()
    torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(got, hidden.grad)


def test_chunked_cross_entropy_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="freeze"):
        chunked_cross_entropy(
            torch.randn(1, 4, 8), torch.randn(50, 8, requires_grad=True), torch.zeros(1, 4, dtype=torch.long)
        )


def test_lmtune_micro_batch_loss_equals_transformers_loss_on_packed_rows(tiny_base, tiny_seqs, smoke_cfg):
    """The whole model, fp32: varlen attention + chunked loss vs sdpa's block mask + model(...).loss,
    same loss and same LoRA gradients."""
    seqs, tokenizer = tiny_seqs
    cfg = OmegaConf.merge(
        OmegaConf.structured(Config), smoke_cfg, {"quant": {"bits": 16, "bnb_4bit_compute_dtype": "fp32"}}
    )
    batch = collate_packed(seqs[:9], tokenizer.pad_token_id, 128)
    assert int((batch["position_ids"] == 0).sum()) > batch["position_ids"].shape[0]  # really packed

    def loss_and_grads(train_overrides):
        tc = OmegaConf.merge(cfg.train, train_overrides)
        model = add_lora(load_for_training(tiny_base, cfg.quant, False), cfg.lora, cfg.seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters do something
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        prepare_model(model, tc)
        loss = micro_batch_loss(model, batch, tc)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fast_loss, fast = loss_and_grads({"attention": "varlen", "chunked_loss": True})
    plain_loss, plain = loss_and_grads({"attention": "sdpa", "chunked_loss": False})
    torch.testing.assert_close(fast_loss, plain_loss)
    assert fast.keys() == plain.keys() and len(fast) > 0
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)
