"""`make sweep LAUNCHER=slurm`'s checks and bookkeeping, without a cluster (tests/pipeline/test_cluster.py
runs it on a real one)."""

import subprocess

import pytest

from lmtune.tools import slurm


def test_the_grid_expands_as_a_local_sweep_queues_it():
    assert slurm.grid_points(["lora.r=4,8", "quant.bits=4,16"]) == [
        ["lora.r=4", "quant.bits=4"],
        ["lora.r=4", "quant.bits=16"],
        ["lora.r=8", "quant.bits=4"],
        ["lora.r=8", "quant.bits=16"],
    ]


def test_relative_remotes_become_absolute_for_jobs_that_run_elsewhere(tmp_path):
    assert slurm.absolute_url("../remote.git", tmp_path / "repo") == str(tmp_path / "remote.git")
    for url in ("/shared/dvc", "s3://bucket/lmtune", "git@host:team/lmtune.git", "ssh://host/path"):
        assert slurm.absolute_url(url, tmp_path) == url


def git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


def test_a_commit_not_on_the_git_remote_or_no_dvc_remote_is_refused_before_any_job(tmp_path):
    repo, remote = tmp_path / "repo", tmp_path / "remote.git"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    (repo / "a.txt").write_text("a")
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "first", cwd=repo)
    git("init", "-q", "--bare", str(remote), cwd=tmp_path)
    git("remote", "add", "origin", str(remote), cwd=repo)
    with pytest.raises(slurm.ClusterError, match="is not on the git remote origin.*git push origin HEAD"):
        slurm.remotes(repo, "origin")
    git("push", "-q", "origin", "HEAD:main", cwd=repo)
    (repo / "a.txt").write_text("edited")
    with pytest.raises(slurm.ClusterError, match="without your edits to a.txt: commit and push"):
        slurm.remotes(repo, "origin")
    git("checkout", "--", "a.txt", cwd=repo)
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "dvc", cwd=repo)
    git("push", "-q", "origin", "HEAD:main", cwd=repo)
    with pytest.raises(slurm.ClusterError, match="no default DVC remote.*dvc remote add -d"):
        slurm.remotes(repo, "origin")
    subprocess.run(["dvc", "remote", "add", "--local", "-d", "team", "../dvc"], cwd=repo, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    assert slurm.remotes(repo, "origin") == (str(remote), str(tmp_path / "dvc"), head)  # ../dvc from the repo


def test_job_states_come_from_the_queue_then_from_the_status_the_script_wrote(tmp_path, monkeypatch):
    jobs = {}
    for name, status in (("a", None), ("b", None), ("c", "0"), ("d", "2"), ("e", None)):
        path = tmp_path / f"{name}.status"
        if status is not None:
            path.write_text(status)
        jobs[name] = {"job": str(len(jobs) + 1), "status": path}
    monkeypatch.setattr(slurm, "run", lambda *cmd, cwd=None, env=None: "1 RUNNING\n2 PENDING")
    current = slurm.states(jobs)
    assert current == {"a": "running", "b": "pending", "c": "done", "d": "failed", "e": "failed"}
    assert slurm.progress(current, started=0).startswith("sweep: 1/5 done, 1 running, 1 pending, 2 failed")


def test_without_sbatch_the_error_says_where_to_run_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(
        slurm.ClusterError, match="not found: run this on a machine that can submit SLURM jobs"
    ):
        slurm.run("squeue", "-h")


def test_a_failed_job_is_named_with_its_log_and_the_finished_ones_are_pulled(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(slurm, "run", lambda *cmd, cwd=None, env=None: called.append(cmd) or "")
    jobs = {
        "slurm-1-0": {"job": "7", "log": tmp_path / "slurm-1-0.log"},
        "slurm-1-1": {"job": "8", "log": tmp_path / "slurm-1-1.log"},
    }
    with pytest.raises(
        slurm.ClusterError, match=r"1 of 2 jobs failed: slurm-1-1 \(job 8, log .*slurm-1-1.log\)"
    ):
        slurm.pull(tmp_path, jobs, {"slurm-1-0": "done", "slurm-1-1": "failed"})
    assert called == [("dvc", "exp", "pull", "origin", "slurm-1-0")]  # the finished one still comes back
