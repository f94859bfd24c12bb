"""Working as a team: runs logged to a real MLflow tracking server, and models shared through a DVC
remote so that a colleague's fresh clone pulls them and reruns nothing."""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from repo_copy import BIN, copy_repo, free_port, git, mlflow_serving, sh


def mlflow_server(store: str, home: Path):
    """`make server`'s command on a free port of 127.0.0.1; yields its URL, then stops it."""
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with mlflow_serving("server", store, "--artifacts-destination", str(home / "artifacts"), env=env) as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A team's tracking server with its default store (sqlite)."""
    home = tmp_path_factory.mktemp("server")
    yield from mlflow_server(f"sqlite:///{home / 'server.db'}", home)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own on a free port of 127.0.0.1 (Debian's postgresql package),
    run as the postgres user: the database refuses to run as root."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    bin_dir = Path(found[-1]).parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="lmtune-pg-"))
    home.chmod(0o755)
    if as_postgres:
        shutil.chown(home, "postgres", "postgres")
    data, port = home / "data", free_port()
    run = lambda *cmd: subprocess.run([*as_postgres, *map(str, cmd)], check=True, capture_output=True)  # noqa: E731
    run(bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "lmtune")
    run(
        bin_dir / "pg_ctl",
        "-D",
        data,
        "-w",
        "-l",
        home / "log",
        "-o",
        f"-p {port} -k {home} -c listen_addresses=127.0.0.1",
        "start",
    )
    try:
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "lmtune", "mlflow")
        yield f"postgresql+psycopg2://lmtune@127.0.0.1:{port}/mlflow", home
    finally:
        run(bin_dir / "pg_ctl", "-D", data, "-w", "stop", "-m", "fast")
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def team_repo(tmp_path_factory, server):
    """The smoke pipeline run with MLFLOW_TRACKING_URI pointing at the server (as a team sets it)."""
    dest = copy_repo(tmp_path_factory.mktemp("team"))
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", cwd=dest)
    sh("dvc", "repro", cwd=dest, env={"MLFLOW_TRACKING_URI": server})
    return dest


def test_runs_land_on_the_tracking_server_and_read_back(team_repo, server):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=server)
    (run,) = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "tiny_random"
    for key in ("train.final_val_loss", "eval.merged.perplexity", "sample.merged_tokens_per_second"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "metrics")}  # through the server
    assert "metrics/samples.md" in reports
    assert not (team_repo / "mlflow.db").exists()  # nothing went to a local store


def test_a_colleague_pulls_the_models_from_a_dvc_remote_and_reruns_nothing(team_repo, tmp_path):
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "team", remote, cwd=team_repo)
    sh("dvc", "push", cwd=team_repo)
    git("add", "-A", cwd=team_repo)  # dvc.lock, metrics/, .dvc/config: what a commit shares
    git("commit", "-qm", "results", cwd=team_repo)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", team_repo, clone, cwd=tmp_path)
    sh("dvc", "pull", cwd=clone)
    assert (clone / "models/adapter/adapter_model.safetensors").read_bytes() == (
        team_repo / "models/adapter/adapter_model.safetensors"
    ).read_bytes()
    assert "up to date" in sh("dvc", "status", cwd=clone).stdout
    assert "Running stage" not in sh("dvc", "repro", cwd=clone).stdout


def test_a_tracking_server_on_postgresql_takes_the_run_too(team_repo, postgres):
    """The same pipeline's numbers into a server whose store is PostgreSQL (`make server STORE=...`):
    `python -m lmtune.track.runs` logs every stage's metrics that dvc.lock vouches for."""
    import mlflow

    store, home = postgres
    for url in mlflow_server(store, home):
        sh(sys.executable, "-m", "lmtune.track.runs", cwd=team_repo, env={"MLFLOW_TRACKING_URI": url})
        client = mlflow.MlflowClient(tracking_uri=url)
        (run,) = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])
        assert run.info.status == "FINISHED"
        for key in (
            "prepare.train.sequences",
            "train.final_val_loss",
            "eval.merged.perplexity",
            "sample.merged_tokens_per_second",
        ):
            assert key in run.data.metrics, key
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6  # read back from the CSV
