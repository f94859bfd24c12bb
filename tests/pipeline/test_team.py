"""Working as a team: runs logged to a real MLflow tracking server, and models shared through a DVC
remote so that a colleague's fresh clone pulls them and reruns nothing."""

import subprocess
import sys

import pytest
from repo_copy import BIN, copy_repo, free_port, git, sh, wait_until_healthy


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`make server`'s command on a free port of 127.0.0.1, with its own store and artifact folder."""
    home = tmp_path_factory.mktemp("server")
    port = free_port()
    process = subprocess.Popen(
        [BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{home / 'server.db'}",
         "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env={"PATH": f"{BIN}:/usr/bin:/bin", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
             "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, process)
    yield url
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def team_repo(tmp_path_factory, server):
    """The smoke pipeline run with MLFLOW_TRACKING_URI pointing at the server (as a team sets it)."""
    dest = copy_repo(tmp_path_factory.mktemp("team"))
    sh(sys.executable, "-m", "lmtune.params", "--force", "experiment=smoke", cwd=dest)
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
