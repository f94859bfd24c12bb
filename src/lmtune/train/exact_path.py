"""Which of lmtune's training paths are exact for a given model, and the fallback where one is not.

Packed rows with per-passage (varlen) attention and the chunked loss are written for the plain
causal attention and plain output head most families share (Llama, Qwen2/3, Phi-3, Gemma, OLMo-2,
SmolLM3, GPT-NeoX, Mixtral, ...). Some families add what those kernels do not implement:

- a sliding window shorter than a passage (Mistral, Gemma-2/3, StarCoder2, OLMo-3, Cohere-2,
  GPT-OSS): varlen attention would let every token see the whole passage;
- soft-capped attention logits (Gemma-2): neither varlen nor sdpa caps them;
- attention sinks (GPT-OSS): an extra logit per head the kernels do not add;
- multi-head latent attention whose value heads differ from its query/key heads (DeepSeek-V2/V3);
- linear-attention layers (Qwen3.5, Qwen3-Next): no per-passage reset of their state in a packed row;
- a scaled or soft-capped output head (Granite `logits_scaling`, Cohere `logit_scale`): the chunked
  loss multiplies hidden states by the plain head weight.

For those the step falls back, with one line saying why, to what transformers computes itself:
padded batches (train.packing=false) with the model's own attention (eager where sdpa lacks a
feature), or transformers' own loss (train.chunked_loss=false). Validation goes through the same
model, so it uses the same path. tests/unit/test_families.py checks each family against
transformers' loss on each passage alone.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def _text_config(config):
    """The language model's config (multimodal checkpoints nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def packing_problems(config, longest_passage: int, has_sinks: bool) -> list[str]:
    """What packed varlen attention would compute wrong for this model, in words."""
    text = _text_config(config)
    layer_types = set(getattr(text, "layer_types", None) or [])
    problems = []
    window = getattr(text, "sliding_window", None)
    sliding = getattr(text, "use_sliding_window", True) is not False and (
        not layer_types or "sliding_attention" in layer_types
    )
    if window and sliding and window < longest_passage:
        problems.append(f"sliding-window attention ({window} tokens, passages up to {longest_passage})")
    if getattr(text, "attn_logit_softcapping", None):
        problems.append("soft-capped attention logits")
    if has_sinks:
        problems.append("attention sinks")
    value, query = getattr(text, "v_head_dim", None), getattr(text, "qk_head_dim", None)
    if value and query and value != query:
        problems.append(f"latent attention with value heads of {value} and query/key heads of {query}")
    if layer_types - {"full_attention", "sliding_attention"}:
        problems.append(f"{', '.join(sorted(layer_types - {'full_attention', 'sliding_attention'}))} layers")
    return problems


def head_problems(config) -> list[str]:
    """What the chunked loss (plain head weight times hidden states) would get wrong."""
    text = _text_config(config)
    problems = []
    if getattr(text, "logits_scaling", 1.0) not in (None, 1.0):
        problems.append(f"output logits divided by logits_scaling={text.logits_scaling}")
    if getattr(text, "logit_scale", 1.0) not in (None, 1.0):
        problems.append(f"output logits scaled by logit_scale={text.logit_scale}")
    if getattr(text, "final_logit_softcapping", None):
        problems.append("soft-capped output logits")
    return problems


def choose_exact_path(model, cfg: DictConfig) -> tuple[DictConfig, str | None, list[str]]:
    """(the config training runs with, an attention implementation to set or None, notes to print).
    The config is cfg itself when every configured kernel is exact for this model."""
    config = model.config
    has_sinks = any(name.endswith("sinks") for name, _ in model.named_parameters())
    tc, notes, attention = cfg.train, [], None
    changes = {}
    if tc.packing and (problems := packing_problems(config, cfg.data.max_length, has_sinks)):
        changes["packing"] = False
        notes.append(
            f"{config.model_type}: {'; '.join(problems)}: packed rows would attend wrongly, so this "
            "model trains on padded batches with transformers' own attention (train.packing=false)"
        )
    if getattr(_text_config(config), "attn_logit_softcapping", None) or has_sinks:
        attention = "eager"  # transformers' sdpa path has neither soft-capping nor sinks
    if tc.chunked_loss and (problems := head_problems(config)):
        changes["chunked_loss"] = False
        notes.append(
            f"{config.model_type}: {'; '.join(problems)}: the chunked loss would drop it, so this "
            "model's loss is transformers' own (train.chunked_loss=false)"
        )
    if not changes:
        return cfg, attention, notes
    exact = OmegaConf.merge(cfg, {"train": changes})
    return exact, attention, notes
