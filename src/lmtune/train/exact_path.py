"""Which of lmtune's training paths are exact for a given model, and the fallback where one is not.

lmtune's packed varlen attention (train.attention=varlen) implements what the families add to
plain causal attention: a sliding window (Mistral, Gemma-2/3, StarCoder2, OLMo-3, Cohere-2,
GPT-OSS), soft-capped logits (Gemma-2), attention sinks (GPT-OSS) and value heads unlike the
query/key heads (DeepSeek's latent attention). The chunked loss applies the family's logit scale
(Granite `logits_scaling`, Cohere `logit_scale`) and cap (Gemma-2 `final_logit_softcapping`), and
is checked against the model's own logits once before training, so a head that does anything else
is caught rather than assumed.

What is left falls back, with one line saying why, to what transformers computes itself: padded
batches (train.packing=false) with the model's own attention (eager where sdpa lacks a feature), or
transformers' own loss (train.chunked_loss=false):
- linear-attention layers (Qwen3.5, Qwen3-Next): their recurrent state does not restart at a
  passage boundary inside a packed row (only flash-linear-attention's kernels take boundaries);
- under train.attention=sdpa, transformers' sdpa on packed rows has no soft-capping and no sinks
  (Gemma-2, GPT-OSS); its masks do keep passages apart and apply sliding windows.
tests/unit/test_families.py checks each family against transformers' loss on each passage alone.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf


def _text_config(config):
    """The language model's config (multimodal checkpoints nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def packing_problems(config, has_sinks: bool, attention: str) -> list[str]:
    """What packed rows would compute wrong for this model under train.attention, in words."""
    text = _text_config(config)
    layer_types = set(getattr(text, "layer_types", None) or [])
    problems = []
    if other := layer_types - {"full_attention", "sliding_attention"}:
        problems.append(f"{', '.join(sorted(other))} layers")
    if attention == "sdpa":
        if getattr(text, "attn_logit_softcapping", None):
            problems.append("soft-capped attention logits (transformers' sdpa has no cap)")
        if has_sinks:
            problems.append("attention sinks (transformers' sdpa has none)")
    return problems


def plain_head(head) -> bool:
    """A head the chunked loss can take: a torch.nn.Linear without bias (its weight times h)."""
    return type(head) is torch.nn.Linear and head.bias is None


def head_transform(config) -> tuple[float, float | None]:
    """(scale, cap) of the family's output logits: logits = cap * tanh(scale * h W^T / cap), as
    Granite (1 / logits_scaling), Cohere (logit_scale) and Gemma-2 (final_logit_softcapping) do."""
    text = _text_config(config)
    scale = 1.0
    if getattr(text, "logits_scaling", None):
        scale /= text.logits_scaling
    if getattr(text, "logit_scale", None):
        scale *= text.logit_scale
    return scale, getattr(text, "final_logit_softcapping", None)


@torch.no_grad()
def head_mismatch(model, scale: float, softcap: float | None, tokens: int = 8) -> float:
    """How far the model's own logits are from what the chunked loss computes from its last hidden
    state (relative to their largest magnitude), on a few tokens: 0 where the head is plain W h
    with the known scale and cap, large where the family's head does something else."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = base.get_output_embeddings().weight
    was_training, attention = base.training, base.config._attn_implementation
    # no dropout, so both forwards see one network; eager, which every family's attention has
    base.eval()
    base.set_attn_implementation("eager")
    try:
        ids = ((torch.arange(tokens, device=weight.device) * 7 + 3) % weight.shape[0])[None]
        logits = base(input_ids=ids, use_cache=False).logits.float()
        hidden = base.base_model(input_ids=ids, use_cache=False).last_hidden_state
        mine = ((hidden * scale) @ weight.to(hidden.dtype).T).float()
        if softcap:
            mine = torch.tanh(mine / softcap) * softcap
    finally:
        base.set_attn_implementation(attention)
        base.train(was_training)
    return float((logits - mine).abs().max() / logits.abs().max().clamp(min=1e-6))


def choose_exact_path(model, cfg: DictConfig) -> tuple[DictConfig, str | None, list[str]]:
    """(the config training runs with, an attention implementation to set or None, notes to print).
    The config is cfg itself when every configured kernel is exact for this model."""
    config, text = model.config, _text_config(model.config)
    has_sinks = any(name.endswith("sinks") for name, _ in model.named_parameters())
    tc, notes, changes = cfg.train, [], {}
    if tc.packing and (problems := packing_problems(config, has_sinks, tc.attention)):
        changes["packing"] = False
        varlen_packs = not packing_problems(config, has_sinks, "varlen")
        notes.append(
            f"{config.model_type}: {'; '.join(problems)}: packed rows would attend wrongly, so this "
            "model trains on padded batches with transformers' own attention (train.packing=false)"
            + ("; train.attention=varlen packs it exactly" if varlen_packs else "")
        )
    packed_varlen = tc.packing and not changes and tc.attention == "varlen"
    # transformers' sdpa path has neither soft-capping nor sinks: padded batches take eager
    needs_eager = getattr(text, "attn_logit_softcapping", None) or has_sinks
    attention = "eager" if needs_eager and not packed_varlen else None
    # 5 % of the largest logit: far above 16-bit rounding, far below any scale or cap left out
    head = plain_head(model.get_output_embeddings())
    if tc.chunked_loss and head and (gap := head_mismatch(model, *head_transform(config))) > 0.05:
        changes["chunked_loss"] = False
        notes.append(
            f"{config.model_type}: the output head computes logits the chunked loss does not (they "
            f"differ by {gap:.0%} of the largest), so this model's loss is transformers' own "
            "(train.chunked_loss=false)"
        )
    if not changes:
        return cfg, attention, notes
    exact = OmegaConf.merge(cfg, {"train": changes})
    return exact, attention, notes
