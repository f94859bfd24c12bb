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

from omegaconf import DictConfig, OmegaConf

from lmtune.model.head import head_mismatch, head_transform, plain_head, text_config


def packing_problems(config, has_sinks: bool, attention: str) -> list[str]:
    """What packed rows would compute wrong for this model under train.attention, in words."""
    text = text_config(config)
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


def choose_exact_path(model, cfg: DictConfig) -> tuple[DictConfig, str | None, dict[str, str]]:
    """(the config training runs with, an attention implementation to set or None, why each key
    it changed was changed: {"train.packing": "..."}). The config is cfg itself when every
    configured kernel is exact for this model."""
    config, text = model.config, text_config(model.config)
    has_sinks = any(name.endswith("sinks") for name, _ in model.named_parameters())
    tc, notes, changes = cfg.train, {}, {}
    if tc.packing and (problems := packing_problems(config, has_sinks, tc.attention)):
        changes["packing"] = False
        varlen_packs = not packing_problems(config, has_sinks, "varlen")
        notes["train.packing"] = (
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
        notes["train.chunked_loss"] = (
            f"{config.model_type}: the output head computes logits the chunked loss does not (they "
            f"differ by {gap:.0%} of the largest), so this model's loss is transformers' own "
            "(train.chunked_loss=false)"
        )
    if not changes:
        return cfg, attention, notes
    exact = OmegaConf.merge(cfg, {"train": changes})
    return exact, attention, notes


def ran_with(asked: DictConfig, ran: DictConfig, why: dict[str, str]) -> dict[str, dict]:
    """Each key training ran with another value than asked: {key: {asked, ran, why}}, for the
    adapter's config.yaml, train.json and the MLflow run to say what ran."""
    return {
        key: {"asked": OmegaConf.select(asked, key), "ran": OmegaConf.select(ran, key), "why": reason}
        for key, reason in why.items()
    }
