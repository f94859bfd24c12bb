"""Two training paths written by hand because no installed library has them on CPU.

- `varlen_attention`: attention over packed rows, one causal block per passage. transformers'
  sdpa path builds a dense block-diagonal mask over the whole packed row, so most of the work
  is masked out. On a CUDA card it calls torch's flash varlen kernel (`varlen_attn`) once for
  all passages; on the CPU, where that kernel does not exist, each passage runs on its own. It
  keeps what families add to causal attention: sliding windows, soft-capped logits (Gemma-2),
  sinks (GPT-OSS), value heads of their own size (DeepSeek's latent attention).
- `chunked_cross_entropy`: the language-model head and its loss over a few hundred tokens at a
  time, with the gradient computed on the way (what Liger's fused linear cross-entropy does on
  GPUs with Triton). The fp32 logits of a whole micro-batch (8 passages: about 1,300 x 49,152
  floats, 260 MB, plus as much again for their gradient) never exist at once. It applies the
  family's logit scale and cap (Granite, Cohere, Gemma-2).
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


def use_flash_varlen(query: torch.Tensor, window: int | None, softcap: float | None, sinks) -> bool:
    """Flash kernels exist for 16-bit CUDA tensors with head size up to 256; torch's has a sliding
    window from the release that takes `window_size`, and neither soft-capping nor sinks. Anything
    else takes the per-passage path, which has all three."""
    options = _flash_varlen_options()
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256
        and options is not None
        and (window is None or "window_size" in options["causal"])
        and softcap is None
        and sinks is None
    )


def _flash_varlen_attention(
    query, key, value, cu_seq_lens, max_length: int, scaling: float, window: int | None
):
    """All passages of [b, h, l, d] rows in one kernel call, on the card: no loop, no host sync."""
    options = _flash_varlen_options()
    batch, heads, length, dim = query.shape
    value_dim = value.shape[-1]
    if value_dim != dim:  # latent attention: the kernel wants one head size, so pad v and cut after
        value = F.pad(value, (0, dim - value_dim))

    def tokens(x):  # [b, h, l, d] → [b*l, h, d], the kernel's packed layout
        return x.transpose(1, 2).reshape(-1, x.shape[1], dim)

    q, k, v = tokens(query), tokens(key), tokens(value)
    extra = dict(options["causal"])
    if window is not None:  # transformers' convention: a token sees itself and window - 1 before it
        extra["window_size"] = (window - 1, 0)
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
    return out.view(batch, length, heads, dim)[..., :value_dim]


def _visible(length: int, window: int | None, device) -> torch.Tensor:
    """[l, l] True where query i may see key j: j <= i, and within the window where there is one."""
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)
    return (distance >= 0) & (distance < window) if window else distance >= 0


def _eager_attention(q, k, v, visible, scaling: float, softcap=None, sinks=None) -> torch.Tensor:
    """Attention as transformers' eager functions compute it, on q [..., h, lq, d], k [..., kv, lk, d]
    and v [..., kv, lk, dv] (grouped heads; dv differs from d in latent attention) → [..., h, lq, dv].
    `visible` ([lq, lk], or [b, 1, lq, lk] from transformers' mask builders) says which keys each
    query sees. Logits are soft-capped before the mask; a per-head sink logit takes part in the
    softmax and is then dropped."""
    *lead, heads, length, _ = q.shape
    groups = k.shape[-3]
    if visible.dim() == 4:  # [b, 1, lq, lk] → [b, 1, 1, lq, lk] against [b, groups, heads/groups, lq, lk]
        visible = visible.unsqueeze(1)
    # each key head serves heads // groups query heads: broadcast instead of copying k and v
    q = (q * scaling).view(*lead, groups, heads // groups, length, q.shape[-1])
    scores = q @ k.unsqueeze(-3).transpose(-1, -2)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    # the dtype's lowest value, not -inf, as transformers' masks: a row that sees nothing (padding)
    # gets finite weights instead of NaN
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    if sinks is None:
        # softmax accumulates in fp32 inside the kernel even for bf16 scores
        weights = torch.softmax(scores, -1)
    else:
        sink = sinks.to(scores.dtype).view(groups, heads // groups, 1, 1).expand(*scores.shape[:-1], 1)
        weights = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    return (weights @ v.unsqueeze(-3)).view(*lead, heads, length, v.shape[-1])


def _passage_attention(q, k, v, scaling: float, window=None, softcap=None, sinks=None) -> torch.Tensor:
    """Causal attention of one passage: q [h, l, d], k [kv, l, d], v [kv, l, dv] → [h, l, dv], with
    the family's sliding window (a token sees itself and window - 1 tokens before it, as in
    transformers' masks), soft-capping and sinks."""
    length = q.shape[-2]
    window = None if window is None or window >= length else window
    # on a card: SDPA's own kernels. On CPU, SDPA's bf16 backward is slower than the matmuls of the
    # eager path (bench/RESULTS.md, "Tried and dropped")
    if q.is_cuda and softcap is None and sinks is None:
        mask = None if window is None else _visible(length, window, q.device)
        return F.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
        )[0]
    return _eager_attention(q, k, v, _visible(length, window, q.device), scaling, softcap, sinks)


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
    sliding_window=None,
    softcap=None,
    s_aux=None,
    **kwargs,
):
    """transformers attention function ([b, h, l, d] in, [b, l, h, d] out). With passage
    boundaries (`cu_seq_lens_q`, `max_length_q`, from `packed_segments`) each passage attends
    only to itself, with the family's sliding window, soft-capping and sinks (`s_aux`) as
    transformers passes them. Without boundaries (padded validation batches), transformers' sdpa
    on its own mask, or the eager computation where sdpa lacks soft-capping or sinks."""
    batch, heads, length, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2] or (dropout and module.training):
        if softcap or s_aux is not None:
            if attention_mask is None:  # transformers' mask builders leave it out for plain causal rows
                attention_mask = _visible(length, None, query.device)
            out = _eager_attention(query, key, value, attention_mask.bool(), scaling, softcap, s_aux)
            return out.transpose(1, 2), None
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if use_flash_varlen(query, sliding_window, softcap, s_aux):
        out = _flash_varlen_attention(query, key, value, cu_seq_lens_q, max_length_q, scaling, sliding_window)
        return out, None
    bounds = cu_seq_lens_q.tolist()
    pieces = []
    # One passage at a time, on views of its rows: a micro-batch holds a few passages, so the
    # loop is short, and nothing is padded or gathered.
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        row, offset = divmod(start, length)
        span = slice(offset, offset + end - start)
        pieces.append(
            _passage_attention(
                query[row, :, span],
                key[row, :, span],
                value[row, :, span],
                scaling,
                sliding_window,
                softcap,
                s_aux,
            )
        )
    out = torch.cat(pieces, 1).view(heads, batch, length, value.shape[-1])
    return out.permute(1, 2, 0, 3), None


def register_varlen_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)  # the sdpa fallback needs its mask
    return VARLEN


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, softcap):
        scored = labels != -100
        count = scored.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            target, keep = labels[rows].clamp(min=0), scored[rows]
            logits = (hidden[rows] @ weight.T).float()
            if softcap:  # softcap * tanh(logits / softcap), as Gemma-2's head
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_probs = torch.log_softmax(logits, -1)
            total -= (log_probs.gather(1, target[:, None]).squeeze(1) * keep).sum()
            # d loss / d logits = (softmax - one_hot) / count on scored rows, built in place; the
            # scale is applied after the matmul, on [rows, d] instead of [rows, vocab]
            probs = log_probs.exp_()
            probs[torch.arange(len(target)), target] -= 1
            if softcap:  # through the cap: d(softcap * tanh(z / softcap)) / dz = 1 - tanh²
                probs *= 1 - capped.square_()
            scale = (keep / count)[:, None]
            grad_hidden[rows] = ((probs.to(hidden.dtype) @ weight).float() * scale).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 256,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean next-token loss of hidden states [b, l, d] through a frozen head `weight` [v, d], as
    transformers computes it (labels shifted by one, -100 unscored), without whole-batch logits.
    `scale` multiplies the logits (Cohere's logit_scale, 1 / Granite's logits_scaling) and
    `softcap` caps them (Gemma-2's final_logit_softcapping), as those families' heads do."""
    if weight.requires_grad:
        raise ValueError("chunked_cross_entropy computes no gradient for the head: freeze it")
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    if scale != 1.0:  # (h @ W.T) * s = (s * h) @ W.T: on [tokens, d], not [tokens, vocab]
        hidden = hidden * scale
    labels = labels[:, 1:].reshape(-1)
    return _ChunkedCrossEntropy.apply(hidden, weight.to(hidden.dtype), labels, chunk, softcap)
