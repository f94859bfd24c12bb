"""A sweep on a real SLURM cluster: Debian's slurmctld, slurmd and munge started as a one-node
cluster by tests/cluster/slurm.sh (state under a temporary folder), a bare git remote, a directory
DVC remote and an MLflow tracking server, as a team has them. The sweep's jobs run the smoke profile
in their own clones and come back into `dvc exp show`, MLflow and `dvc exp apply` + `dvc pull`.
And multi-node training through the stage, on a two-node cluster whose nodes are network
namespaces."""

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest
from repo_copy import ROOT, git, mlflow_serving, sh

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        shutil.which("slurmctld") is None or shutil.which("sbatch") is None,
        reason="needs Debian's slurmctld, slurmd, slurm-client and munge (make test-cluster installs them)",
    ),
]
SLURM = ROOT / "tests" / "cluster" / "slurm.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The one-node cluster, up for this module; the environment its clients need."""
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(SLURM), "start", str(state)], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield {"SLURM_CONF": str(state / "etc" / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SLURM), "stop", str(state)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def team(repo, tmp_path_factory):
    """The smoke repository with a bare git remote holding its commit, a directory DVC remote holding
    its outputs, and an MLflow tracking server."""
    dest, _ = repo
    shared = tmp_path_factory.mktemp("team")
    sh("git", "clone", "-q", "--bare", dest, shared / "lmtune.git", cwd=shared)
    git("remote", "add", "origin", shared / "lmtune.git", cwd=dest)
    git("fetch", "-q", "origin", cwd=dest)
    sh("dvc", "remote", "add", "--local", "-d", "team", shared / "dvc", cwd=dest)
    sh("dvc", "push", "-q", cwd=dest)
    with mlflow_serving("server", f"sqlite:///{shared / 'mlflow.db'}") as url:
        yield dest, url


@pytest.fixture(scope="module")
def swept(cluster, team):
    dest, url = team
    env = {**cluster, "MLFLOW_TRACKING_URI": url}
    options = "--cpus-per-task=1 --mem=3G --time=30:00"
    run = sh(
        sys.executable, "-m", "lmtune.tools.slurm", "--profile", "smoke", "--sbatch", options,
        "--poll", "2", "--timeout", "1500", "lora.r=4,12", cwd=dest, env=env,
    )  # fmt: skip
    return dest, url, env, run.stdout


def experiments_shown(dest) -> dict[str, int]:
    """Experiment name → its lora.r, from `dvc exp show --json` (a tree of commits and their runs)."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict):
                params = (node["data"].get("params") or {}).get("params.yaml", {}).get("data", {})
                found[node["name"]] = params.get("lora", {}).get("r")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(sh("dvc", "exp", "show", "--json", "-A", cwd=dest).stdout))
    return found


def test_a_sweep_on_slurm_comes_back_into_dvc_exp_show_mlflow_and_compare(swept):
    dest, url, env, printed = swept
    assert "sweep: 2/2 done, 0 running, 0 pending, 0 failed" in printed, printed
    assert "1 running" in printed or "2 running" in printed  # the progress line followed the jobs
    names = [line.split()[1] for line in printed.splitlines() if line.startswith("submitted ")]
    assert len(names) == 2
    shown = experiments_shown(dest)
    assert sorted(shown.get(name) for name in names) == [4, 12], shown

    client = mlflow.MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])
    swept_runs = {
        r.data.tags.get("dvc_experiment"): r for r in runs if r.data.tags.get("dvc_experiment") in names
    }
    assert sorted(r.data.params["lora.r"] for r in swept_runs.values()) == ["12", "4"]
    for run in swept_runs.values():
        assert run.info.status == "FINISHED" and "eval.merged.perplexity" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6

    sh(sys.executable, "-m", "lmtune.track.compare", cwd=dest, env=env)  # make compare, on the team's server
    table = (dest / "reports/sweep.md").read_text()
    (smoke,) = [part for part in table.split("\n## ") if part.startswith("tiny_random on ")]
    rows = [line for line in smoke.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 2, smoke  # header, rule and the two jobs' runs


def test_an_experiment_from_slurm_applies_and_pulls_to_a_clean_workspace(swept):
    dest, _, env, printed = swept
    name = next(line.split()[1] for line in printed.splitlines() if line.startswith("submitted "))
    sh("dvc", "exp", "apply", name, cwd=dest)
    sh("dvc", "pull", "-q", cwd=dest, env=env)
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=dest).stdout
    assert json.loads((dest / "metrics/train.json").read_text())["trainable_parameters"] == 65536 // 4


def test_a_job_requeued_midway_resumes_to_the_adapter_an_uninterrupted_job_writes(cluster, team):
    """Two jobs of the same point; one is requeued (what a time limit or a preemption does) once its
    first checkpoint is written. It starts again in its clone and resumes from that checkpoint, and
    both end with the same adapter, byte for byte."""
    import os
    import time

    from repo_copy import BIN

    dest, url = team
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", **cluster}
    env["MLFLOW_TRACKING_URI"] = url
    point = ["lora.r=8,8", "train.max_steps=30", "train.checkpoint_every=5"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lmtune.tools.slurm", "--profile", "smoke", "--poll", "2", "--timeout", "1500"]
        + ["--sbatch", "--cpus-per-task=1 --mem=3G --time=30:00", *point],
        cwd=dest, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    submitted = []
    while len(submitted) < 2:
        line = launcher.stdout.readline()
        assert line, "the launcher ended before submitting both jobs"
        if line.startswith("submitted "):
            submitted.append((line.split()[1], line.split("job ")[1].split(")")[0]))
    (name, job), (uninterrupted, _) = submitted
    checkpoints = dest / ".slurm" / name / "models" / "checkpoints"
    deadline = time.monotonic() + 900
    while not list(checkpoints.glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    at = sorted(p.name for p in checkpoints.glob("step-*"))
    assert at, "no checkpoint within 15 minutes"
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    rest, _ = launcher.communicate(timeout=1500)
    assert launcher.returncode == 0 and "sweep: 2/2 done" in rest, rest
    log = (dest / ".slurm" / f"{name}.log").read_text()
    assert "restart 1" in log and "resuming from" in log, log[-3000:]
    assert int(at[0].removeprefix("step-")) < 30  # it was midway
    adapter = "models/adapter/adapter_model.safetensors"
    assert (dest / ".slurm" / name / adapter).read_bytes() == (
        dest / ".slurm" / uninterrupted / adapter
    ).read_bytes()


@pytest.fixture
def two_nodes(tmp_path_factory):
    """A two-node cluster: each node a network namespace with its own address and its own slurmd
    (tests/cluster/netns.sh), the controller on this machine as on a cluster's head node. Its own
    controller port, so that it may run beside the one-node cluster."""
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("nsenter")):
        pytest.skip("nodes are made of network namespaces: needs root, iproute2 and nsenter")
    env = {
        **os.environ,
        "SLURM_TEST_NETNS": "lmtc",
        "NETNS_SUBNET": "10.78.0",
        "SLURM_TEST_CTLD_PORT": "6827",
    }
    netns = ROOT / "tests" / "cluster" / "netns.sh"
    made = subprocess.run(["bash", netns, "up", "lmtc"], env=env, capture_output=True, text=True)
    subprocess.run(["bash", netns, "down", "lmtc"], env=env, capture_output=True)
    if made.returncode != 0:  # a container without CAP_NET_ADMIN, or without bridges
        pytest.skip(f"network namespaces cannot be made here: {made.stderr.strip()[-300:]}")
    state = tmp_path_factory.mktemp("slurm2")
    try:
        started = subprocess.run(["bash", SLURM, "start", state], env=env, capture_output=True, text=True)
        assert started.returncode == 0, started.stderr[-3000:]
        yield {"SLURM_CONF": str(state / "etc" / "slurm.conf")}
    finally:  # the namespaces too, whatever happened
        subprocess.run(["bash", SLURM, "stop", state], capture_output=True, timeout=120)


def test_a_two_node_allocation_trains_through_the_stage_as_one_process_with_twice_the_accumulation(
    two_nodes, smoke_template, tmp_path
):
    """conf/slurm/finetune.sbatch on a real two-node allocation: node 0 prepares the data first,
    then runs the stage through DVC, node 1 the stage script; node 1 finds node 0 through SLURM's
    node list and scontrol, at the address the cluster knows it by (never a name that resolves to
    the loopback). In fp32 the loss curve and the adapter are one process's with twice the
    accumulation, dvc.lock records the stage, and one MLflow run is made, node 0's."""
    import pandas as pd
    from safetensors.torch import load_file

    template, _ = smoke_template
    dest = tmp_path / "project"
    shutil.copytree(template, dest, symlinks=True)
    fp32 = ["quant.bits=16", "quant.bnb_4bit_compute_dtype=fp32"]
    two = ["train.distributed=ddp", "train.num_nodes=2", "train.num_processes=1", "train.grad_accum=1"]
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", *fp32, *two, cwd=dest)
    one = tmp_path / "one"
    sh(
        sys.executable, "stages/finetune.py", "train.distributed=none", "train.num_nodes=1",
        "train.grad_accum=2", f"paths.adapter={one}/adapter", f"paths.metrics={one}/metrics",
        f"paths.checkpoints={one}/ckpt", cwd=dest, env={"MLFLOW_TRACKING_URI": f"sqlite:///{one}.db"},
    )  # fmt: skip

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    runs = lambda: client.search_runs([e.experiment_id for e in client.search_experiments()])  # noqa: E731
    before = {r.info.run_id for r in runs()}
    shutil.rmtree(dest / "data" / "processed")  # node 0 must make it again before node 1 reads it

    log = tmp_path / "job.log"
    env = {**two_nodes, "GLOO_SOCKET_IFNAME": "lmtceth"}  # the nodes' interface, as eth0 on real hosts
    sh("sbatch", "--wait", "--output", log, "conf/slurm/finetune.sbatch", cwd=dest, env=env, timeout=900)
    printed = log.read_text()
    assert "'prepare'" in printed and (dest / "data" / "processed").is_dir(), printed[-3000:]
    (launch,) = [line for line in printed.splitlines() if "on node 1 of 2" in line]
    assert "--machine_rank 1" in launch and "--main_process_ip 10.78.0.1" in launch  # node 0's NodeAddr

    recorded = json.loads((dest / "metrics/train.json").read_text())
    assert (recorded["nodes"], recorded["processes"]) == (2, 2)
    curves = [pd.read_csv(run / "metrics/train_loss.csv")["loss"] for run in (one, dest)]
    assert len(curves[0]) == 6 and curves[0].tolist() == pytest.approx(curves[1].tolist(), rel=1e-5, abs=1e-6)
    a, b = (load_file(run / "adapter/adapter_model.safetensors") for run in (one, dest / "models"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # fp32: reduction order only
    assert "up to date" in sh("dvc", "status", "finetune", cwd=dest).stdout

    (made,) = [r for r in runs() if r.info.run_id not in before]  # one run: node 1 opened none
    assert made.data.params["train.num_nodes"] == "2"
