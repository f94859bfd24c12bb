"""MLflow: one run per pipeline execution. finetune opens it; later stages log into it."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lmtune.artifacts import read_json
from lmtune.config import flatten, git_commit

RUN_FILE = "tracking.json"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any long work starts."""


_SECRET = re.compile(r"token|password|passwd|secret|api_?key|credential", re.IGNORECASE)


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


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def safe_params(cfg: DictConfig) -> dict[str, Any]:
    """Flattened config without anything that looks like a secret."""
    return {k: ("***" if _SECRET.search(k) else v) for k, v in flatten(cfg).items()}


def start_run(cfg: DictConfig, run_name: str | None = None) -> str:
    """Open the pipeline's run: params = flattened resolved config; tags = commit, DVC experiment."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        # Artifacts next to the store, not under whatever directory the first run started in
        # (a DVC queue worker's temporary copy would take them with it).
        location = (repo_root() / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.tracking.experiment)
    tags = {"git_commit": git_commit() or "unknown", "model": cfg.model.name, "data": cfg.data.name}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    name = run_name or os.environ.get("DVC_EXP_NAME")
    run = mlflow.start_run(run_name=name, tags=tags)
    mlflow.log_params({k: str(v)[:6000] for k, v in safe_params(cfg).items()})
    return run.info.run_id


def check_reachable(cfg: DictConfig) -> str:
    """Fail fast, before a model loads, when the configured store cannot be reached."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except OSError as err:
            raise TrackingError(
                f"tracking.uri={uri} is not reachable ({err}). Start the server "
                "(mlflow server --host 127.0.0.1 --port 5000) or set tracking.uri=null to log "
                "into mlflow.db at the repo root."
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking store {uri}: folder {folder} is not writable; set tracking.uri")
    return uri


@contextlib.contextmanager
def best_effort(what: str) -> Iterator[None]:
    """Tracking never costs the user their outputs: a logging failure is reported, not fatal."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any tracking failure is survivable
        print(
            f"warning: MLflow {what} failed ({type(err).__name__}: {str(err)[:200]}); "
            "the stage's outputs and metrics/*.json are complete.",
            file=sys.stderr,
        )


def step_logger():
    """on_step callback for training: logs each step's numbers; after one failure it warns once
    and stops trying, so a tracking server going away never stops or stalls training."""
    working = True

    def log(step: int, record: dict) -> None:
        nonlocal working
        if working:
            try:
                log_metrics(record, step=step)
            except Exception as err:  # noqa: BLE001
                working = False
                print(f"warning: MLflow step logging failed ({type(err).__name__}); training goes on, "
                      "curves stay in metrics/*.csv", file=sys.stderr)  # fmt: skip

    return log


def log_to_run(cfg: DictConfig, adapter_dir: str | Path, metrics: dict, prefix: str,
               artifacts: tuple[str | Path, ...] = ()) -> None:  # fmt: skip
    """Log a later stage's metrics and files into the run that finetune opened
    (its id travels in models/adapter/tracking.json)."""
    import mlflow

    with best_effort(f"logging {prefix.rstrip('.')}"):
        info = read_json(Path(adapter_dir) / RUN_FILE)
        mlflow.set_tracking_uri(info.get("tracking_uri") or tracking_uri(cfg))
        with mlflow.start_run(run_id=info["run_id"]):
            log_metrics(metrics, prefix=prefix)
            for path in artifacts:
                mlflow.log_artifact(str(path))


def log_stage_seconds(cfg: DictConfig, stage: str, seconds: float) -> None:
    """A stage's wall time, into the pipeline's run once finetune has opened it (base and prepare
    run before it exists): `make compare` sums them into the experiment's wall time."""
    if (Path(cfg.paths.adapter) / RUN_FILE).is_file():
        log_to_run(cfg, cfg.paths.adapter, {stage: seconds}, prefix="wall_seconds.")


def log_metrics(metrics: dict[str, Any], prefix: str = "", step: int | None = None) -> None:
    """Log every finite number in a (nested) metrics dict under dotted names."""
    import math

    import mlflow

    flat = flatten(metrics, prefix=prefix)
    numbers = {
        k: float(v) for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }  # fmt: skip
    if numbers:
        mlflow.log_metrics(numbers, step=step)
