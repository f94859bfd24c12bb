"""The stage scripts' shared `main`: load params.yaml, check, run inside the pipeline's MLflow run.

User errors (bad config, bad data, missing model, unusable store) print one clear message and exit 2
instead of a traceback. `--multirun` (Hydra) is offered by stages that name the `paths` they write.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from lmtune import LmtuneError, provenance
from lmtune.artifacts import write_json
from lmtune.config import PARAMS_FILE, ConfigError, load, validate
from lmtune.pipeline.params import check_profile_kept
from lmtune.track import runs as tracking
from lmtune.train import distributed

Stage = Callable[[DictConfig], dict]


def stage_spec(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> dict:
    """A stage's entry in dvc.yaml (for a `foreach` stage, such as align's, its `do` template)."""
    spec = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]
    return spec.get("do", spec)


def stage_inputs(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> set[str]:
    """The `paths` keys a stage reads (its `${paths.X}` deps in dvc.yaml): they need not be writable."""
    try:
        deps = stage_spec(stage, dvc_yaml).get("deps", [])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return set()
    return {m[1] for d in deps if (m := re.fullmatch(r"\$\{paths\.(\w+)\}", str(d)))}


def stage_params(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The params.yaml keys DVC records for a stage (its `params:` in dvc.yaml)."""
    try:
        return [str(k) for k in stage_spec(stage, dvc_yaml).get("params", [])]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []


def recorded_values(keys: list[str]) -> dict:
    """What params.yaml holds now for `keys`, as DVC would read it for dvc.lock."""
    try:
        on_disk = OmegaConf.load(PARAMS_FILE)
    except Exception:  # noqa: BLE001 - gone or unreadable: every key counts as changed
        return {}
    return {
        key: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(on_disk, key)}))["v"]
        for key in keys
    }


def changed_under(stage: str, before: dict) -> str | None:
    """params.yaml changed under a running stage (an edit, `git stash`, `git checkout`): which of
    the stage's keys now differ from what it ran with, or None. DVC would record the new values in
    dvc.lock beside outputs made with the old ones."""
    now = recorded_values(list(before))
    changed = [key for key in before if now.get(key) != before[key]]
    if not changed:
        return None
    shown = []
    for key in changed:
        was, is_ = before[key], now.get(key)
        if isinstance(was, dict) and isinstance(is_, dict):
            inner = [k for k in {**was, **is_} if was.get(k) != is_.get(k)]
            shown += [f"{key}.{k}: {was.get(k)!r} -> {is_.get(k)!r}" for k in inner]
        else:
            shown.append(f"{key}: {was!r} -> {is_!r}")
    return (
        f"params.yaml changed while {stage} ran ({', '.join(shown)}; a `git stash`, `git checkout` or an "
        f"edit?). {stage} ran with the values it started with, so it fails here and DVC does not record "
        "it: put params.yaml back and rerun, or rerun on the new values (make run)"
    )


def stage_folders(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The `paths` keys of the folders a stage writes (its `${paths.X}` outs in dvc.yaml)."""
    try:
        outs = stage_spec(stage, dvc_yaml).get("outs", [])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    return [m[1] for o in outs if isinstance(o, str) and (m := re.fullmatch(r"\$\{paths\.(\w+)\}", o))]


def record_made_by(cfg: DictConfig, stage: str, metrics: dict) -> None:
    """What made this stage's outputs (lmtune.provenance), inside each folder it wrote and in
    metrics/made_by/<stage>.json."""
    record = provenance.made_by(cfg, stage, stage_params(stage), (metrics or {}).get("ran_with"))
    for key in stage_folders(stage):
        if Path(cfg.paths[key]).is_dir():
            write_json(Path(cfg.paths[key]) / provenance.FILE, record)
    write_json(Path(cfg.paths.metrics) / provenance.MADE_BY / f"{stage}.json", record)


def check_writable(cfg: DictConfig, inputs: set[str] = frozenset()) -> None:
    """Every folder the stage may write (or the nearest existing parent) must be writable before
    work starts; its inputs are only read, and a problem with them is not named as theirs."""
    for key, value in cfg.paths.items():
        if key in inputs:
            continue
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


def stage_name(run: Stage) -> str:
    """A stage is named after its script (stages/merge.py → merge), as in dvc.yaml."""
    return Path(inspect.getfile(run)).stem


def tuned_follows(argv: list[str]) -> list[str]:
    """`key=value` overrides, with paths.tuned moved along when paths.adapter (or paths.aligned,
    after preference tuning) is, and paths.policy along with paths.tuned (or paths.rl, after RL):
    in conf/ they are interpolations, but params.yaml holds them resolved, so a by-hand
    `paths.adapter=X` would leave merge reading the old folder."""
    given = dict(a.split("=", 1) for a in argv if "=" in a)
    moved = {"paths.adapter", "paths.aligned", "paths.tuned", "paths.rl"} & given.keys()
    if not moved:
        return argv
    try:
        on_disk = OmegaConf.load(PARAMS_FILE)
    except Exception:  # noqa: BLE001 - load() says what is wrong with it
        return argv
    value = lambda key, default=None: given.get(key, OmegaConf.select(on_disk, key, default=default))  # noqa: E731
    added = []
    if "paths.tuned" not in given and {"paths.adapter", "paths.aligned"} & moved:
        key = "paths.adapter" if value("align.method", "none") == "none" else "paths.aligned"
        added.append(f"paths.tuned={value(key)}")
    tuned = dict(a.split("=", 1) for a in added).get("paths.tuned", value("paths.tuned"))
    if "paths.policy" not in given and (added or {"paths.tuned", "paths.rl"} & moved):
        added.append(f"paths.policy={tuned if value('rl.method', 'none') == 'none' else value('paths.rl')}")
    return [*argv, *added]


def run_stage(run: Stage, argv: list[str] | None = None, multirun_outputs: tuple[str, ...] = ()) -> int:
    """Load the config (params.yaml + ``key=value`` overrides), run the stage in the pipeline's
    MLflow run, print its metrics."""
    argv = sys.argv[1:] if argv is None else argv
    if "--multirun" in argv or "-m" in argv:
        return _multirun(run, [a for a in argv if a not in ("--multirun", "-m")], multirun_outputs)
    try:
        if argv and argv[0].startswith(f"{distributed.RESOLVED}="):  # a worker of a distributed stage
            cfg = validate(OmegaConf.load(argv[0].split("=", 1)[1]), source="the launching stage's config")
            tracked = contextlib.nullcontext()  # the launching process owns the MLflow run
        else:
            cfg = load(tuned_follows(argv))
            # under `accelerate launch` by hand (multi-node), the main process logs for all
            tracked = (
                tracking.stage_run(cfg, stage_name(run))
                if distributed.is_main()
                else contextlib.nullcontext()
            )
            check_profile_kept(cfg)
        check_writable(cfg, stage_inputs(stage_name(run)))
        started_with = recorded_values(stage_params(stage_name(run)))
        with tracked:
            metrics = run(cfg)
            if changed := changed_under(stage_name(run), started_with):
                raise ConfigError(changed)  # inside the MLflow run: it is marked failed
            if distributed.is_main() and not distributed.in_worker():
                record_made_by(cfg, stage_name(run), metrics)
    except LmtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: {stage_name(run)} stopped. Nothing half-written was kept (an output appears only "
            "once complete); rerun to go on (finetune resumes from its last checkpoint).",
            file=sys.stderr,
        )
        return 130
    except Exception as err:
        if not _disk_full(err):
            raise
        print(
            f"error: the disk is full ({str(err).splitlines()[0]}). Nothing half-written was kept; free "
            "space (df -h; dvc gc removes unused cache) and rerun.",
            file=sys.stderr,
        )
        return 2
    if distributed.is_main():
        print(json.dumps(metrics, indent=2, default=str))
    return 0


def _disk_full(err: BaseException) -> bool:
    """No space left: an OSError, or a library's own error carrying it (safetensors: os error 28)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(err) or "os error 28" in str(err)


def _multirun(run: Stage, overrides: list[str], outputs: tuple[str, ...]) -> int:
    """Hydra's own multirun over params.yaml: its sweeper expands `lora.r=4,8`, numbers the jobs
    and keeps each job's config in multirun/<date>/<time>/<job>/.hydra. Each job writes `outputs`
    into its own folder and logs into its own MLflow run (its paths differ from the pipeline's)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    if not outputs:
        print(
            "error: --multirun is for a quick look at one stage (finetune); sweep the whole pipeline "
            "with `make sweep` or `dvc exp run --queue -S ...`",
            file=sys.stderr,
        )
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
            with tracking.stage_run(cfg, stage_name(run)):
                print(json.dumps(run(cfg), indent=2, default=str))
        except LmtuneError as err:  # one bad job does not stop the others
            print(f"error in job {name}: {err}", file=sys.stderr)
            failed.append(name)

    saved = sys.argv
    sys.argv = [saved[0], "--multirun", *overrides]
    try:
        job()
    finally:
        sys.argv = saved
    return 2 if failed else 0
