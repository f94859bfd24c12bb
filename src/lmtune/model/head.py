"""The output head as a separate step: logits from the decoder's last hidden state a few hundred
tokens at a time, so neither training nor evaluation holds a whole batch's vocabulary-wide logits.

A family's head may scale its logits (Granite `1 / logits_scaling`, Cohere `logit_scale`) or cap
them (Gemma-2 `final_logit_softcapping`); `head_transform` reads both from the config, and
`head_mismatch` compares the result with the model's own logits on a few tokens, so a head that
does anything else is caught rather than assumed.
"""

from __future__ import annotations

import torch


def text_config(config):
    """The language model's config (multimodal checkpoints nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def plain_head(head) -> bool:
    """A head the chunked loss can take: a torch.nn.Linear without bias (its weight times h)."""
    return type(head) is torch.nn.Linear and head.bias is None


def head_transform(config) -> tuple[float, float | None]:
    """(scale, cap) of the family's output logits: logits = cap * tanh(scale * h W^T / cap), as
    Granite (1 / logits_scaling), Cohere (logit_scale) and Gemma-2 (final_logit_softcapping) do."""
    text = text_config(config)
    scale = 1.0
    if getattr(text, "logits_scaling", None):
        scale /= text.logits_scaling
    if getattr(text, "logit_scale", None):
        scale *= text.logit_scale
    return scale, getattr(text, "final_logit_softcapping", None)


def head_logits(head, hidden: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """fp32 logits of hidden states [n, d] through the head module, the scale and the cap applied
    in the head's own dtype, in the order transformers applies them."""
    logits = head(hidden)
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


@torch.no_grad()
def head_mismatch(model, scale: float, softcap: float | None, tokens: int = 8) -> float:
    """How far the model's own logits are from the head applied to its last hidden state with the
    known scale and cap (relative to their largest magnitude), on a few tokens: 0 where the head is
    what `head_transform` says, large where the family's head does something else."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    was_training, attention = base.training, base.config._attn_implementation
    # no dropout, so both forwards see one network; eager, which every family's attention has
    base.eval()
    base.set_attn_implementation("eager")
    try:
        vocab = head.out_features if hasattr(head, "out_features") else base.config.vocab_size
        ids = ((torch.arange(tokens, device=base.device) * 7 + 3) % vocab)[None]
        logits = base(input_ids=ids, use_cache=False).logits.float()
        hidden = base.base_model(input_ids=ids, use_cache=False).last_hidden_state
        mine = head_logits(head, hidden[0], scale, softcap)[None]
    finally:
        base.set_attn_implementation(attention)
        base.train(was_training)
    return float((logits - mine).abs().max() / logits.abs().max().clamp(min=1e-6))
