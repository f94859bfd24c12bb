"""The pipeline's MLflow run: one per configuration, opened by every stage that executes.

A run's identity is the configuration's identity (lmtune.config.identity: every resolved param
but those that change no output) plus the DVC experiment name when there is one (run_params.py);
both are run tags, never a file inside a DVC-cached model. Every stage that executes opens that
run through `stage_run` (creating it the first time), logs into it and, when it ends, logs the
numbers and report files of every stage in metrics/ that belong to this configuration
(stage_metrics.py): its own, and those dvc.lock vouches for (lineage.py). So a stage that DVC
skipped or restored from its run cache still has its metrics in the run, and a stage still to run
never leaves another configuration's numbers in it.
Tracking never costs the user their outputs: a store that cannot be opened (store.py) fails the
stage before any work; anything that fails afterwards is one warning.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lmtune import LmtuneError, provenance
from lmtune.track import lineage, store
from lmtune.track.run_params import mlflow_name, params_hash, run_name, safe_params
from lmtune.track.stage_metrics import METRICS_FILES, REPORT_FILES, numbers, pipeline_metrics

PARAMS_HASH_TAG = "lmtune.params_hash"
KIND_TAG = "lmtune.kind"


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
        metrics = [Metric(mlflow_name(k), v, now, step or 0) for k, v in numbers.items()]
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

    uri = store.check_reachable(cfg)
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
        store.follow_project(uri)
        mlflow_client = mlflow.MlflowClient(tracking_uri=uri)
        experiment_id = store.experiment_id(mlflow_client, cfg.tracking.experiment, uri)
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
                experiment_id, tags=tags, run_name=run_name(cfg, digest)
            ).info.run_id
            _log_params(mlflow_client, run_id, cfg)
            return StageRun(mlflow_client, run_id, stage, created=True)
    except Exception as err:  # noqa: BLE001 - any store failure here means it cannot be used
        raise store.TrackingError(
            f"{store.uri_origin(cfg)} cannot be used as an MLflow store ({type(err).__name__}: "
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


def log_table(frame, artifact_file: str) -> None:
    """A table (pandas DataFrame) into the active stage's run, browsable in the MLflow UI (its
    artifact view shows the rows, and the UI's evaluation view compares runs' tables); a no-op
    without a run."""
    if _active is not None:
        _active._try(
            f"logging {artifact_file}",
            lambda: _active.client.log_table(_active.run_id, data=frame, artifact_file=artifact_file),
        )


def step_logger() -> Callable[[int, dict], None]:
    """on_step callback for training: each step's numbers into the active stage's run (a no-op
    when the stage runs without one, as in tests that call a stage's `run` directly)."""
    run = _active

    def log(step: int, record: dict) -> None:
        if run is not None:
            run.log_metrics(numbers(record, ""), step=step)

    return log


def log_comparison(uri: str, experiment: str, files: list[Path]) -> None:
    """`make compare`'s table and plots, as a run of their own tagged lmtune.kind=comparison."""
    mlflow_client = store.client(uri)
    experiment_id = store.experiment_id(mlflow_client, experiment, uri)
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
