"""Two training paths written by hand because no installed library has them on CPU.

- `varlen_attention`: attention over packed rows, one causal block per passage. transformers'
  sdpa path builds a dense block-diagonal mask over the whole packed row, so most of the work
  is masked out. On a CUDA card it calls torch's flash varlen kernel (`varlen_attn`) once for
  all passages; on the CPU, where that kernel does not exist, each passage runs on its own.
- `chunked_cross_entropy`: the language-model head and its loss over a few hundred tokens at a
  time, with the gradient computed on the way (what Liger's fused linear cross-entropy does on
  GPUs with Triton). The fp32 logits of a whole micro-batch (8 passages: about 1,300 x 49,152
  floats, 260 MB, plus as much again for their gradient) never exist at once.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import torch.nn.functional as F

VARLEN = "lmtune_varlen"  # the attention implementation's name in transformers' registry


def packed_segments(position_ids: torch.Tensor) -> dict:
    """Passage boundaries of packed rows (positions restart at 0 for each passage), in the
    flash-attention varlen convention transformers passes down to attention functions. Called on
    the host copy of a micro-batch: the longest passage is a Python int the kernel needs, and
    reading it from a card's tensor would stall the card once per micro-batch."""
    flat = position_ids.flatten()
    starts = (flat == 0).nonzero().flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((ends - starts).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


@cache
def _flash_varlen_options() -> dict | None:
    """How this torch's `varlen_attn` is asked for causal, grouped-query, scaled attention (torch
    2.10 took `is_causal` and no scale, later releases a causal `window_size`), or None where torch
    has no such kernel."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return {"fn": varlen_attn, "causal": causal, "gqa": "enable_gqa" in params, "scale": "scale" in params}


def use_flash_varlen(query: torch.Tensor) -> bool:
    """Flash kernels exist for 16-bit CUDA tensors with head size up to 256; anything else takes
    the per-passage path."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256
        and _flash_varlen_options() is not None
    )


def _flash_varlen_attention(query, key, value, cu_seq_lens, max_length: int, scaling: float):
    """All passages of [b, h, l, d] rows in one kernel call, on the card: no loop, no host sync."""
    options = _flash_varlen_options()
    batch, heads, length, dim = query.shape

    def tokens(x):  # [b, h, l, d] → [b*l, h, d], the kernel's packed layout
        return x.transpose(1, 2).reshape(-1, x.shape[1], dim)

    q, k, v = tokens(query), tokens(key), tokens(value)
    extra = dict(options["causal"])
    if options["scale"]:
        extra["scale"] = scaling
    elif scaling != dim**-0.5:  # the kernel's own scale is 1/sqrt(dim): fold the difference into q
        q = q * (scaling * dim**0.5)
    if k.shape[1] != heads:  # grouped query heads
        if options["gqa"]:
            extra["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    cu = cu_seq_lens.to(query.device, non_blocking=True)
    out = options["fn"](q, k, v, cu, cu, max_length, max_length, **extra)
    return out.view(batch, length, heads, dim)


def _causal_attention(q, k, v, scaling: float) -> torch.Tensor:
    """Causal attention of one passage: q [h, l, d], k and v [kv, l, d] (grouped heads) → [h, l, d]."""
    # fp32 on a card: SDPA's own kernels. On CPU, SDPA's bf16 backward was slower than the matmuls
    # below (per passage, 30 layers: 2.1-3.0 s against 1.4-1.6 s per micro-batch on the 2-core
    # bench machine)
    if q.is_cuda:
        return F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, scale=scaling, enable_gqa=True
        )[0]
    heads, length, dim = q.shape
    groups = k.shape[0]
    # each key head serves heads // groups query heads: broadcast instead of copying k and v
    q = (q * scaling).view(groups, heads // groups, length, dim)
    scores = q @ k.unsqueeze(1).transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    # softmax accumulates in fp32 inside the kernel even for bf16 scores
    return (torch.softmax(scores, -1) @ v.unsqueeze(1)).view(heads, length, dim)


def varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    cu_seq_lens_q=None,
    max_length_q=None,
    **kwargs,
):
    """transformers attention function ([b, h, l, d] in, [b, l, h, d] out). With passage
    boundaries (`cu_seq_lens_q`, `max_length_q`, from `packed_segments`) each passage attends
    only to itself; without them, this is transformers' sdpa."""
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2] or (dropout and module.training):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, length, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    if use_flash_varlen(query):
        return _flash_varlen_attention(query, key, value, cu_seq_lens_q, max_length_q, scaling), None
    bounds = cu_seq_lens_q.tolist()
    pieces = []
    # One passage at a time, on views of its rows: a micro-batch holds a few passages, so the
    # loop is short, and nothing is padded or gathered.
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        row, offset = divmod(start, length)
        span = slice(offset, offset + end - start)
        pieces.append(_causal_attention(query[row, :, span], key[row, :, span], value[row, :, span], scaling))
    out = torch.cat(pieces, 1).view(heads, batch, length, dim)
    return out.permute(1, 2, 0, 3), None


def register_varlen_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)  # the sdpa fallback needs its mask
    return VARLEN


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        scored = labels != -100
        count = scored.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            target, keep = labels[rows].clamp(min=0), scored[rows]
            log_probs = torch.log_softmax((hidden[rows] @ weight.T).float(), -1)
            total -= (log_probs.gather(1, target[:, None]).squeeze(1) * keep).sum()
            # d loss / d logits = (softmax - one_hot) / count on scored rows, built in place; the
            # scale is applied after the matmul, on [rows, d] instead of [rows, vocab]
            probs = log_probs.exp_()
            probs[torch.arange(len(target)), target] -= 1
            scale = (keep / count)[:, None]
            grad_hidden[rows] = ((probs.to(hidden.dtype) @ weight).float() * scale).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """Mean next-token loss of hidden states [b, l, d] through a frozen head `weight` [v, d], as
    transformers computes it (labels shifted by one, -100 unscored), without whole-batch logits."""
    if weight.requires_grad:
        raise ValueError("chunked_cross_entropy computes no gradient for the head: freeze it")
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = labels[:, 1:].reshape(-1)
    return _ChunkedCrossEntropy.apply(hidden, weight.to(hidden.dtype), labels, chunk)
