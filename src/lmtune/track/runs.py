"""MLflow, and only here: one run per pipeline configuration.

A run's identity is the hash of the resolved params (all but `tracking:`, which only says where to
log) plus the DVC experiment name when there is one; both are run tags, never a file inside a
DVC-cached model. Every stage that executes opens that run through `stage_run` (creating it the
first time), logs into it and, when it ends, logs the numbers and report files of every stage in
metrics/ that belong to this configuration: its own, and those dvc.lock vouches for (lineage.py).
So a stage that DVC skipped or restored from its run cache still has its metrics in the run, and
a stage still to run never leaves another configuration's numbers in it.
Tracking never costs the user their outputs: a store that cannot be opened fails the stage before
any work; anything that fails afterwards is one warning.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmtune import LmtuneError, provenance
from lmtune.config import flatten
from lmtune.track import lineage

PARAMS_HASH_TAG = "lmtune.params_hash"
KIND_TAG = "lmtune.kind"
# what each stage leaves in metrics/: the prefix of its numbers in MLflow → its file
METRICS_FILES = {
    "prepare": "prepare.json",
    "train": "train.json",
    "merge": "merge.json",
    "quantize": "quantize.json",
    "eval": "eval.json",
    "sample": "sample.json",
}
REPORT_FILES = ("train_loss.csv", "val_loss.csv", "eval.md", "samples.md", "samples.jsonl")
# A name that is a credential as a whole word (hf_token, api_key), not one that merely contains it
# (eval.prompt_tokens, sample.max_new_tokens).
_SECRET = re.compile(r"(^|[._])(\w*_)?(token|password|passwd|secret|api_?key|credentials?)$", re.IGNORECASE)


class TrackingError(LmtuneError, RuntimeError):
    """The tracking store cannot be used; raised before any long work starts."""


def repo_root() -> Path:
    """The repository the user works in. DVC queue workers run in temporary copies and set
    DVC_ROOT to the original, so their runs land in the same store as everyone else's."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        )
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd()


def default_uri() -> str:
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def tracking_uri(cfg: DictConfig) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def _uri_origin(cfg: DictConfig) -> str:
    """Where the URI came from, in the words the user must change it with."""
    if cfg.tracking.uri:
        return f"tracking.uri={cfg.tracking.uri}"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return f"MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']} (from the environment)"
    return f"the default store {default_uri()}"


def safe_params(cfg: DictConfig | dict) -> dict[str, Any]:
    """Flattened config without anything that looks like a secret."""
    return {k: ("***" if _SECRET.search(k) else v) for k, v in flatten(cfg).items()}


def params_hash(cfg: DictConfig) -> str:
    """The identity of a pipeline configuration: every resolved param but `tracking`, plus the DVC
    experiment name (two experiments are two runs even with equal params)."""
    params = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "tracking"}
    params["dvc_experiment"] = os.environ.get("DVC_EXP_NAME")
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_reachable(cfg: DictConfig) -> str:
    """Fail fast, before a model loads, when the configured store cannot be reached."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except OSError as err:
            undo = "unset MLFLOW_TRACKING_URI" if not cfg.tracking.uri else "set tracking.uri=null"
            raise TrackingError(
                f"{_uri_origin(cfg)} is not reachable ({err}). Start the server "
                f"(make server, or mlflow server --host 127.0.0.1 --port 5000), or {undo} to log "
                "into mlflow.db at the repo root."
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"{_uri_origin(cfg)}: folder {folder} is not writable; set tracking.uri")
    return uri


def client(uri: str | None = None):
    """An MlflowClient on `uri` (default: mlflow.db at the repo root)."""
    import mlflow

    uri = uri or default_uri()
    follow_project(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


# (table, column) pairs of MLflow's schema that hold artifact locations
_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("logged_models", "artifact_location"),
)


def follow_project(uri: str) -> str | None:
    """Point the default store's artifact locations at this project's mlartifacts/ when the project
    was copied or moved; returns the old folder, or None when nothing pointed elsewhere.

    MLflow records absolute artifact locations when a store is made and has no way to change them,
    so a copied project would go on writing (and reading) artifacts in the original folder. Only the
    default store (mlflow.db at the repo root) is rewritten: a shared store's locations are the team's.
    """
    import sqlite3

    if uri != default_uri() or not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    root = repo_root().resolve()
    with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=30)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            return None  # a new store: MLflow makes its tables, lmtune its experiment
        here = (root / "mlartifacts").as_uri()
        locations = [row[0] for row in db.execute("SELECT artifact_location FROM experiments")]
        old = next((loc for loc in locations if loc and loc.endswith("/mlartifacts") and loc != here), None)
        if old is None:
            return None
        with db:  # one transaction: every location or none
            for table, column in _LOCATION_COLUMNS:
                if table in tables:
                    db.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                        (here, len(old) + 1, old, len(old) + 1, old + "/"),
                    )
    print(
        f"note: this project's MLflow store pointed at {old} (the project was copied or moved); "
        f"its artifacts are now read and written in {here}",
        file=sys.stderr,
    )
    return old


def _experiment_id(mlflow_client, name: str, uri: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        # Artifacts next to the store, not under whatever directory the first run started in
        # (a DVC queue worker's temporary copy would take them with it).
        location = (repo_root() / "mlartifacts").resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - a parallel worker created it first
        return mlflow_client.get_experiment_by_name(name).experiment_id


def _run_name(cfg: DictConfig, digest: str) -> str:
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    bits = f"qat-{cfg.quant.qat}" if cfg.quant.qat else f"{cfg.quant.bits}bit"
    return f"{cfg.model.name}-{cfg.data.name}-r{cfg.lora.r}-{bits}-{digest[:6]}"


def _numbers(metrics: dict, prefix: str) -> dict[str, float]:
    flat = flatten(metrics, prefix=prefix)
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def pipeline_metrics(metrics_dir: str | Path, files: set[str] | None = None) -> dict[str, float]:
    """The numbers of each stage's metrics file in `metrics_dir` (those named in `files`, if given),
    under MLflow's names (`train.final_val_loss`, `eval.merged.perplexity`, ...)."""
    numbers: dict[str, float] = {}
    for prefix, name in METRICS_FILES.items():
        path = Path(metrics_dir) / name
        if files is not None and str(path) not in files:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not produced (yet): a --multirun job, a stage that never ran
        if prefix == "eval":  # per model: each metric's value, its speed figures, its benchmarks
            benchmarks = data.get("benchmarks", {})
            data = {
                model: {m: v["value"] for m, v in per.items()}
                | data.get("speed", {}).get(model, {})
                | {
                    task: {metric: entry["value"] for metric, entry in scores.items()}
                    for task, scores in benchmarks.get(model, {}).items()
                }
                for model, per in data.get("models", {}).items()
            }
        numbers.update(_numbers(data, f"{prefix}."))
    return numbers


def _warn(what: str, err: BaseException) -> None:
    print(
        f"warning: MLflow {what} failed ({type(err).__name__}: {str(err)[:200]}); "
        "the stage's outputs and metrics/*.json are complete.",
        file=sys.stderr,
    )


class StageRun:
    """The pipeline run as one stage sees it. Logging is best effort: after the first failure it
    warns once and stops trying, so a tracking server going away never stops or stalls work."""

    def __init__(self, mlflow_client, run_id: str, stage: str, created: bool = False):
        self.client, self.run_id, self.stage = mlflow_client, run_id, stage
        self.created = created  # this stage opened a new run for its configuration
        self.working = True

    def end_refused(self) -> None:
        """A stage that refused its input before any work: a run it just made, holding no number,
        is deleted rather than left FAILED (one per file tried would pile up); else marked FAILED."""
        try:
            if self.created and not self.client.get_run(self.run_id).data.metrics:
                self.client.delete_run(self.run_id)
                return
        except Exception as err:  # noqa: BLE001 - any tracking failure is survivable
            _warn("removing the refused run", err)
        self.finish("FAILED")

    def _try(self, what: str, action: Callable[[], Any]) -> None:
        if not self.working:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001 - any tracking failure is survivable
            self.working = False
            _warn(what, err)

    def log_metrics(self, numbers: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step or 0) for k, v in numbers.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            batch = metrics[start : start + 1000]
            self._try(f"logging {self.stage} metrics", lambda b=batch: self.client.log_batch(self.run_id, b))

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).is_file():
            self._try(
                f"logging {Path(path).name}", lambda: self.client.log_artifact(self.run_id, str(path), folder)
            )

    def missing(self, metric: str) -> bool:
        try:
            return not self.client.get_metric_history(self.run_id, metric)
        except Exception:  # noqa: BLE001 - unknown is treated as present: nothing is logged twice
            return False

    def finish(self, status: str) -> None:
        self._try(f"closing the run as {status}", lambda: self.client.set_terminated(self.run_id, status))


_active: StageRun | None = None


def open_run(cfg: DictConfig, stage: str) -> StageRun:
    """Find this configuration's run (by its params hash) or create it, and mark it running.
    Raises TrackingError, before any work, when the store cannot be used."""
    import mlflow

    uri = check_reachable(cfg)
    digest = params_hash(cfg)
    state, machine = provenance.git_state(), provenance.host()
    tags = {
        PARAMS_HASH_TAG: digest,
        "git_commit": state["commit"] or "unknown",
        "git_dirty": str(state["dirty"]).lower(),  # uncommitted changes to tracked files when it ran
        "model": cfg.model.name,
        "data": cfg.data.name,
        "host": json.dumps(machine),
        **{f"version.{name}": version for name, version in provenance.versions().items() if version},
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    try:
        follow_project(uri)
        mlflow_client = mlflow.MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(mlflow_client, cfg.tracking.experiment, uri)
        found = mlflow_client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARAMS_HASH_TAG}` = '{digest}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            mlflow_client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():  # the commit that ran this stage
                mlflow_client.set_tag(run_id, key, value)
        else:
            run_id = mlflow_client.create_run(
                experiment_id, tags=tags, run_name=_run_name(cfg, digest)
            ).info.run_id
            _log_params(mlflow_client, run_id, cfg)
            return StageRun(mlflow_client, run_id, stage, created=True)
    except Exception as err:  # noqa: BLE001 - any store failure here means it cannot be used
        raise TrackingError(
            f"{_uri_origin(cfg)} cannot be used as an MLflow store ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). For a damaged mlflow.db, move it aside "
            "(mv mlflow.db mlflow.db.broken) and a new one is made; or point tracking.uri elsewhere."
        ) from None
    return StageRun(mlflow_client, run_id, stage)


def _log_params(mlflow_client, run_id: str, cfg: DictConfig) -> None:
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in safe_params(cfg).items()]
    for start in range(0, len(params), 100):  # MLflow's batch limit for params
        mlflow_client.log_batch(run_id, params=params[start : start + 100])


def log_pipeline(run: StageRun, cfg: DictConfig) -> None:
    """The numbers and report files of every stage whose metrics belong to this configuration
    (the running stage's, and those dvc.lock vouches for: lineage.current_files), and the base's
    and adapter's descriptions: the run then holds the stages DVC skipped or restored, too."""
    metrics_dir = Path(cfg.paths.metrics)
    names = [str(metrics_dir / name) for name in (*METRICS_FILES.values(), *REPORT_FILES)]
    current = set(lineage.current_files(cfg, run.stage, names))
    run.log_metrics(pipeline_metrics(metrics_dir, current))
    for curve in ("train_loss", "val_loss"):  # a run whose finetune DVC skipped: its curves from the CSVs
        path = str(metrics_dir / f"{curve}.csv")
        if path in current and run.missing(curve):
            with open(path) as f:
                for row in csv.DictReader(f):
                    run.log_metrics({curve: float(row["loss"])}, step=int(row["step"]))
    for name in names:
        if name in current:
            run.log_artifact(name, "metrics")
    run.log_artifact(Path(cfg.paths.base) / "source.json", "base")
    run.log_artifact(Path(cfg.paths.adapter) / "adapter_config.json", "adapter")


@contextlib.contextmanager
def stage_run(cfg: DictConfig, stage: str) -> Iterator[StageRun]:
    """The lifecycle of one stage in the pipeline's run: open it (failing before any work if the
    store cannot be used), let the stage log steps, then log its wall time and every stage's
    metrics and mark the run FINISHED; a stage that raises marks it FAILED."""
    global _active
    run = open_run(cfg, stage)
    began = time.perf_counter()
    _active = run
    try:
        yield run
    except LmtuneError:
        run.end_refused()
        raise
    except BaseException:
        run.finish("FAILED")
        raise
    finally:
        _active = None
    run.log_metrics({f"wall_seconds.{stage}": time.perf_counter() - began})
    log_pipeline(run, cfg)
    run.finish("FINISHED")


def record_ran_with(ran_with: dict[str, dict]) -> None:
    """Keys the stage ran with other values than its params say (a model family's fallback), as
    tags of the active run beside those params: `ran.train.packing: false (asked: true; why)`."""
    if _active is not None:
        for key, entry in ran_with.items():
            value = f"{json.dumps(entry['ran'])} (asked: {json.dumps(entry['asked'])}; {entry['why']})"
            _active._try(
                f"tagging {key}", lambda k=key, v=value: _active.client.set_tag(_active.run_id, f"ran.{k}", v)
            )


def step_logger() -> Callable[[int, dict], None]:
    """on_step callback for training: each step's numbers into the active stage's run (a no-op
    when the stage runs without one, as in tests that call a stage's `run` directly)."""
    run = _active

    def log(step: int, record: dict) -> None:
        if run is not None:
            run.log_metrics(_numbers(record, ""), step=step)

    return log


def log_comparison(uri: str, experiment: str, files: list[Path]) -> None:
    """`make compare`'s table and plots, as a run of their own tagged lmtune.kind=comparison."""
    mlflow_client = client(uri)
    experiment_id = _experiment_id(mlflow_client, experiment, uri)
    run_id = mlflow_client.create_run(
        experiment_id, tags={KIND_TAG: "comparison"}, run_name="comparison"
    ).info.run_id
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), "plots" if path.suffix == ".png" else None)
    mlflow_client.set_terminated(run_id, "FINISHED")


def sync(cfg: DictConfig) -> StageRun:
    """After `dvc repro` (`make run` does this): log into this configuration's run every stage's
    metrics that dvc.lock vouches for. It covers what no executing stage could: stages that DVC
    skipped after the last stage that ran, or a repro that restored every stage from its cache."""
    run = open_run(cfg, "sync")  # not a stage: no file is its own, dvc.lock decides for all
    log_pipeline(run, cfg)
    run.finish("FINISHED")
    return run


def main(argv: list[str]) -> int:
    """python -m lmtune.track.runs [key=value ...]: `sync` for the current params.yaml."""
    from lmtune.config import load

    try:
        print(f"MLflow run {sync(load(argv)).run_id} holds every stage's metrics")
    except LmtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
