"""The default MLflow store follows a moved project. lmtune.track.store.follow_project rewrites
artifact locations with SQL on MLflow's own tables (MLflow's API cannot change them), so these
tests make stores with MLflow's client and fail, naming the column, when its schema moves."""

import shutil
import sqlite3

import mlflow
import pytest

from lmtune.track import store


def columns(db_file, table: str) -> set[str]:
    with sqlite3.connect(db_file) as db:
        return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def test_mlflow_still_has_every_column_follow_project_reads_and_writes(tmp_path):
    db_file = tmp_path / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db_file}").search_experiments()  # MLflow makes its tables
    for table, column in store.LOCATION_COLUMNS:
        assert column in columns(db_file, table), (
            f"MLflow {mlflow.__version__} has no column {table}.{column}: lmtune.track.store.follow_project "
            "(LOCATION_COLUMNS) rewrites it when a project is copied or moved; update both to the new schema"
        )


def test_the_default_store_follows_a_moved_project(tmp_path, monkeypatch):
    old_root, new_root = (tmp_path / "old").resolve(), (tmp_path / "new").resolve()
    old_root.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(old_root))
    client = store.client()
    experiment = store.experiment_id(client, "lmtune", store.default_uri())
    run = client.create_run(experiment).info
    client.create_registered_model("m")
    client.create_model_version("m", f"{run.artifact_uri}/model", run_id=run.run_id)
    model = client.create_logged_model(experiment)
    assert run.artifact_uri.startswith((old_root / "mlartifacts").as_uri() + "/")

    shutil.move(old_root, new_root)
    monkeypatch.setenv("DVC_ROOT", str(new_root))
    assert store.follow_project(store.default_uri()) == (old_root / "mlartifacts").as_uri()
    assert store.follow_project(store.default_uri()) is None  # once is enough

    here = (new_root / "mlartifacts").as_uri()
    moved = mlflow.MlflowClient(tracking_uri=store.default_uri())
    version = moved.get_model_version("m", "1")
    locations = {
        "experiments.artifact_location": moved.get_experiment(experiment).artifact_location,
        "runs.artifact_uri": moved.get_run(run.run_id).info.artifact_uri,
        "model_versions.source": version.source,
        "logged_models.artifact_location": moved.get_logged_model(model.model_id).artifact_location,
    }
    for column, location in locations.items():
        assert location == here or location.startswith(here + "/"), (column, location)
    with sqlite3.connect(new_root / "mlflow.db") as db:
        (stored,) = db.execute("SELECT storage_location FROM model_versions").fetchone()
    assert stored.startswith(here + "/"), ("model_versions.storage_location", stored)


@pytest.mark.parametrize("uri", ["sqlite:///elsewhere/mlflow.db", "http://127.0.0.1:5000"])
def test_a_store_other_than_the_project_s_own_is_never_rewritten(uri, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert store.follow_project(uri) is None
