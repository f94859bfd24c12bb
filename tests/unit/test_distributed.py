"""Distributed training through accelerate on this CPU (gloo): 2 processes train as 1 does with the
same global batch, and only the main process writes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from lmtune.pipeline.params import compose_conf, write_params
from lmtune.train.distributed import micro_batch_index

ROOT = Path(__file__).resolve().parents[2]
FP32 = ["quant.bits=16", "quant.bnb_4bit_compute_dtype=fp32", "train.max_steps=4", "train.eval_every=2"]


def test_processes_share_out_the_micro_batches_of_one_step():
    seen = [
        [micro_batch_index(step=3, micro=m, grad_accum=2, rank=r, processes=2) for m in range(2)]
        for r in (0, 1)
    ]
    assert seen == [
        [12, 14],
        [13, 15],
    ]  # together: 4 consecutive micro-batches, as one process with 4x accumulation
    assert [micro_batch_index(3, m, 4) for m in range(4)] == [12, 13, 14, 15]


@pytest.fixture
def workspace(tmp_path, tiny_base, monkeypatch):
    """params.yaml of the smoke profile on the tiny base, and its prepared splits."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_conf(
        ["experiment=smoke", f"paths.base={tiny_base}", "data.max_samples=200"], conf_dir=ROOT / "conf"
    )
    write_params(cfg, tmp_path / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([sys.executable, ROOT / "stages/prepare.py"], check=True, env=env, capture_output=True)
    return tmp_path, env


def finetune(workspace, name: str, *overrides: str) -> Path:
    root, env = workspace
    out = root / name
    args = [f"paths.adapter={out}/adapter", f"paths.metrics={out}/metrics", f"paths.checkpoints={out}/ckpt"]
    result = subprocess.run(
        [sys.executable, ROOT / "stages/finetune.py", *FP32, *overrides, *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_train_as_one_does_with_the_same_global_batch(workspace):
    one = finetune(workspace, "one", "train.grad_accum=2")
    two = finetune(workspace, "two", "train.distributed=ddp", "train.num_processes=2", "train.grad_accum=1")
    curves = [pd.read_csv(run / "metrics/train_loss.csv")["loss"] for run in (one, two)]
    assert len(curves[0]) == 4 and curves[0].tolist() == pytest.approx(curves[1].tolist(), rel=1e-5, abs=1e-6)
    a, b = (load_file(run / "adapter/adapter_model.safetensors") for run in (one, two))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # fp32: reduction order only
    assert {p.name for p in (one / "adapter").iterdir()} == {p.name for p in (two / "adapter").iterdir()}
    one_json, two_json = (json.loads((run / "metrics/train.json").read_text()) for run in (one, two))
    assert (
        two_json["train_tokens"] == one_json["train_tokens"]
    )  # every passage once, by the process that read it
    assert (one_json["processes"], two_json["processes"]) == (1, 2)
    assert one_json["global_batch_passages"] == two_json["global_batch_passages"]  # 4 x 2 x 1 = 4 x 1 x 2
    for run in (one_json, two_json):  # global tokens over the wall time of the steps, for 1 and N alike
        assert run["tokens_per_second"] == pytest.approx(run["train_tokens"] / run["train_seconds"])
    assert not (two / "ckpt").exists()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="two hosts are made of network namespaces: needs root and iproute2",
)
def test_two_hosts_train_one_adapter_as_one_process_does_and_only_the_main_node_writes(workspace):
    """Two hosts made on this machine with network namespaces (tests/cluster/netns.sh: each with its
    own address on one bridge), one process each, gloo over that link: train.num_nodes=2
    runs the stage on both, node 1 finding node 0 by LMTUNE_MAIN_ADDR as it would by SLURM's node
    list. The loss curve equals one process with twice the accumulation, and node 1 writes nothing."""
    root, env = workspace
    netns = ROOT / "tests" / "cluster" / "netns.sh"
    made = subprocess.run(["bash", netns, "up", "lmtd"], capture_output=True, text=True)
    if made.returncode != 0:  # a container without CAP_NET_ADMIN
        subprocess.run(["bash", netns, "down", "lmtd"], capture_output=True)  # what half-made
        pytest.skip(f"network namespaces cannot be made here: {made.stderr.strip()[-300:]}")
    try:
        one = finetune(workspace, "one", "train.grad_accum=2")
        nodes = []
        for rank in (0, 1):
            out = root / f"node{rank}"
            paths = [
                f"paths.adapter={out}/adapter",
                f"paths.metrics={out}/metrics",
                f"paths.checkpoints={out}/ckpt",
            ]
            keys = [
                "train.distributed=ddp",
                "train.num_nodes=2",
                "train.num_processes=1",
                "train.grad_accum=1",
            ]
            node_env = {
                **env,
                "LMTUNE_NODE_RANK": str(rank),
                "LMTUNE_MAIN_ADDR": "10.77.0.1",  # node 0's address on the link, never the loopback
                "LMTUNE_MAIN_PORT": "29517",
                "GLOO_SOCKET_IFNAME": "lmtdeth",
            }
            command = ["ip", "netns", "exec", f"lmtd{rank}", sys.executable, ROOT / "stages/finetune.py"]
            nodes.append(
                subprocess.Popen(
                    [*command, *FP32, *keys, *paths],
                    env=node_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        printed = [node.communicate(timeout=900)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], printed[0][-3000:] + printed[1][-3000:]
    finally:
        subprocess.run(["bash", netns, "down", "lmtd"], capture_output=True)
    two = root / "node0"
    assert not (root / "node1").exists()  # node 1 trained, and wrote nothing
    assert "on node 1 of 2" in printed[1] and "--machine_rank 1" in printed[1]
    curves = [pd.read_csv(run / "metrics/train_loss.csv")["loss"] for run in (one, two)]
    assert len(curves[0]) == 4 and curves[0].tolist() == pytest.approx(curves[1].tolist(), rel=1e-5, abs=1e-6)
    a, b = (load_file(run / "adapter/adapter_model.safetensors") for run in (one, two))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    recorded = json.loads((two / "metrics/train.json").read_text())
    assert (recorded["nodes"], recorded["processes"]) == (2, 2)


def test_several_nodes_need_a_way_to_find_the_main_one_and_the_allocation_must_match(monkeypatch):
    from omegaconf import OmegaConf

    from lmtune.config import ConfigError
    from lmtune.train.distributed import DistributedError, nodes

    with pytest.raises(ConfigError, match="train.num_nodes=2: needs train.distributed=ddp or fsdp"):
        compose_conf(["experiment=smoke", "train.num_nodes=2"], conf_dir=ROOT / "conf")
    cfg = OmegaConf.create({"train": {"num_nodes": 2}})
    for name in (
        "LMTUNE_MAIN_ADDR",
        "LMTUNE_NODE_RANK",
        "SLURM_JOB_NODELIST",
        "SLURM_NNODES",
        "SLURM_NODEID",
    ):
        monkeypatch.delenv(name, raising=False)
    assert nodes(OmegaConf.create({"train": {"num_nodes": 1}})) == []
    with pytest.raises(DistributedError, match="start this stage on every node.*LMTUNE_MAIN_ADDR"):
        nodes(cfg)
    monkeypatch.setenv("SLURM_NNODES", "3")
    with pytest.raises(DistributedError, match="this SLURM allocation has 3 nodes: sbatch --nodes=2"):
        nodes(cfg)
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("LMTUNE_MAIN_ADDR", "10.0.0.7")
    assert nodes(cfg) == ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.7"] + [
        "--main_process_port",
        "29500",
    ]


def test_under_slurm_the_main_node_is_the_allocations_first_at_the_address_slurm_reaches_it_by(
    tmp_path, monkeypatch
):
    """SLURM_JOB_NODELIST's first node, resolved by scontrol (a stand-in here that answers as
    SLURM 22.05's does) to its NodeAddr: the address the cluster's own daemons use for it."""
    from omegaconf import OmegaConf

    from lmtune.train.distributed import DistributedError, nodes

    scontrol = tmp_path / "scontrol"
    scontrol.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  "show hostnames gpu[07-08]") printf "gpu07\\ngpu08\\n" ;;\n'
        '  "--oneliner show node gpu07") echo "NodeName=gpu07 Arch=x86_64 NodeAddr=10.1.2.7 NodeHostName=gpu07" ;;\n'
        '  "show hostnames cpu[1-2]") printf "cpu1\\ncpu2\\n" ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n"
    )
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("LMTUNE_MAIN_ADDR", raising=False)
    monkeypatch.delenv("LMTUNE_NODE_RANK", raising=False)
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    cfg = OmegaConf.create({"train": {"num_nodes": 2}})
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    assert nodes(cfg)[2:6] == ["--machine_rank", "1", "--main_process_ip", "10.1.2.7"]
    monkeypatch.setenv("SLURM_JOB_NODELIST", "cpu[1-2]")  # no node record: its name, as DNS knows it
    assert nodes(cfg)[4:6] == ["--main_process_ip", "cpu1"]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # SLURM's variables, but not its commands
    with pytest.raises(DistributedError, match="start this stage on every node"):
        nodes(cfg)
