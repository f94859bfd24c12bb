"""Where the MLflow store is and how it is opened: the repository root, the tracking URI and where
it was configured, a reachability check made before any work, and the experiment runs go into.

The default store is mlflow.db at the repo root with artifacts in mlartifacts/ beside it. MLflow
records those artifact locations as absolute paths, so `follow_project` rewrites them when the
project was copied or moved; it is the one place lmtune edits MLflow's tables itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from omegaconf import DictConfig

from lmtune import LmtuneError


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


def uri_origin(cfg: DictConfig) -> str:
    """Where the URI came from, in the words the user must change it with."""
    if cfg.tracking.uri:
        return f"tracking.uri={cfg.tracking.uri}"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return f"MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']} (from the environment)"
    return f"the default store {default_uri()}"


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
                f"{uri_origin(cfg)} is not reachable ({err}). Start the server "
                f"(make server, or mlflow server --host 127.0.0.1 --port 5000), or {undo} to log "
                "into mlflow.db at the repo root."
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"{uri_origin(cfg)}: folder {folder} is not writable; set tracking.uri")
    return uri


def client(uri: str | None = None):
    """An MlflowClient on `uri` (default: mlflow.db at the repo root)."""
    import mlflow

    uri = uri or default_uri()
    follow_project(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


# (table, column) pairs of MLflow's schema that hold artifact locations. follow_project rewrites
# them; tests/unit/test_tracking_store.py fails when a new MLflow no longer has one of them.
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("logged_models", "artifact_location"),
)


def follow_project(uri: str) -> str | None:
    """Point the default store's artifact locations at this project's mlartifacts/ when the project
    was copied or moved; returns the old folder, or None when nothing pointed elsewhere.

    A copied project would otherwise go on writing (and reading) artifacts in the original folder.
    Only the default store (mlflow.db at the repo root) is rewritten: a shared store's locations
    are the team's.
    """
    import sqlite3

    if uri != default_uri() or not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    root = repo_root().resolve()
    # SQL on MLflow's own tables, not MlflowClient: MLflow sets an experiment's artifact_location,
    # a run's artifact_uri, a model version's source and storage_location and a logged model's
    # artifact_location once, when it creates them, and its API has no call that changes any of
    # them (update_run: status and name; update_model_version: description; rename_experiment:
    # the name). The test of the columns above keeps this honest across MLflow versions.
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
            for table, column in LOCATION_COLUMNS:
                if table in tables:  # a store made by an older MLflow may lack a table
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


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The id of experiment `name`, created the first time it is asked for."""
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
