"""Two training paths written by hand because no installed library has them on CPU.

- `varlen_attention`: attention over packed rows, one causal block per passage. transformers'
  sdpa path builds a dense block-diagonal mask over the whole 512-token row, so most of the work
  is masked out; flash-attn's varlen kernels are CUDA-only. Here the passages of a micro-batch are
  grouped by length and each group runs causal attention on its own.
- `chunked_cross_entropy`: the language-model head and its loss over a few hundred tokens at a
  time, with the gradient computed on the way (what Liger's fused linear cross-entropy does on
  GPUs with Triton). The fp32 logits of a whole micro-batch (2,048 x 49,152 floats, 400 MB, plus
  as much again for their gradient) never exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARLEN = "lmtune_varlen"  # the attention implementation's name in transformers' registry


def packed_segments(position_ids: torch.Tensor) -> dict:
    """Passage boundaries of packed rows (positions restart at 0 for each passage), in the
    flash-attention varlen convention transformers passes down to attention functions."""
    flat = position_ids.flatten()
    starts = (flat == 0).nonzero().flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((ends - starts).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _causal_attention(q, k, v, scaling: float) -> torch.Tensor:
    """Causal attention on [n, h, w, d] queries and [n, kv, w, d] keys/values (grouped heads)."""
    n, heads, width, dim = q.shape
    groups = k.shape[1]
    q = q.reshape(n, groups, heads // groups * width, dim)  # the heads sharing a key: one matmul
    scores = (q @ k.transpose(-1, -2)).view(n, groups, heads // groups, width, width) * scaling
    scores = scores.masked_fill(torch.ones(width, width, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype)
    return (probs.view(n, groups, heads // groups * width, width) @ v).view(n, heads, width, dim)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, **kwargs):  # fmt: skip
    """transformers attention function ([b, h, l, d] in, [b, l, h, d] out). With passage
    boundaries (`cu_seq_lens_q`, from `packed_segments`) each passage attends only to itself;
    without them, this is transformers' sdpa."""
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2] or (dropout and module.training):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)  # fmt: skip
    batch, heads, length, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    bounds = cu_seq_lens_q.tolist()
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    # Passages of one padded width run together: rounding up to 32 tokens wastes little compute
    # and keeps the number of small matmuls down.
    widths = [-(-(end - start) // 32) * 32 for start, end in spans]
    pieces = [None] * len(spans)
    for width in sorted(set(widths)):
        members = [i for i, w in enumerate(widths) if w == width]

        def group(t, members=members, width=width):
            return torch.stack([F.pad(t[s:e], (0, 0, 0, 0, 0, width - (e - s))) for s, e in
                                (spans[i] for i in members)]).transpose(1, 2)  # fmt: skip

        out = _causal_attention(*(group(t) for t in flat), scaling).transpose(1, 2)
        for j, i in enumerate(members):  # padding sits after each passage: causal, so unseen
            pieces[i] = out[j, : spans[i][1] - spans[i][0]]
    return torch.cat(pieces).view(batch, length, heads, dim), None


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


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int = 256) -> torch.Tensor:  # fmt: skip
    """Mean next-token loss of hidden states [b, l, d] through a frozen head `weight` [v, d], as
    transformers computes it (labels shifted by one, -100 unscored), without whole-batch logits."""
    if weight.requires_grad:
        raise ValueError("chunked_cross_entropy computes no gradient for the head: freeze it")
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = labels[:, 1:].reshape(-1)
    return _ChunkedCrossEntropy.apply(hidden, weight.to(hidden.dtype), labels, chunk)
