"""RL as a pipeline stage, on the smoke profile in a temporary copy of the repo: experiment=rl_smoke
adds the rl stage after finetune, merge takes its adapter, every rollout batch is stored as data
and logged to MLflow, `make replay` retrains the same adapter from them, and rl=none is the
pipeline as it was."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from repo_copy import sh, workspace_hash

from lmtune.track import runs as tracking


@pytest.fixture(scope="module")
def reinforced(repo):
    """The rl_smoke chain on top of the reproduced smoke SFT, and what `dvc repro` printed."""
    dest, _ = repo
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=rl_smoke", cwd=dest)
    return dest, sh("dvc", "repro", cwd=dest).stdout


def test_rl_runs_after_the_sft_and_merge_eval_and_sample_take_its_adapter(reinforced):
    dest, printed = reinforced
    assert "Running stage 'finetune'" not in printed  # the SFT adapter is reused
    for stage in ("rl@grpo", "merge", "eval", "sample"):
        assert f"Running stage '{stage}'" in printed
    lock = yaml.safe_load((dest / "dvc.lock").read_text())["stages"]
    assert "models/rl" in {d["path"] for d in lock["merge"]["deps"]}
    assert {"models/rl", "data/rollouts"} <= {o["path"] for o in lock["rl@grpo"]["outs"]}
    result = json.loads((dest / "metrics/rl.json").read_text())
    assert result["steps"] == 4 and result["loss_type"] == "dapo" and result["task"] == "chain_sum"
    assert {"start", "tuned", "gain"} == set(result["held_out"]["accuracy"])
    assert {"reward", "completions/mean_length", "entropy", "generation_tokens_per_second"} <= set(
        result["final"]
    )
    curve = pd.read_csv(dest / "metrics/rl_curve.csv")
    assert list(curve["step"]) == [1, 2, 3, 4] and "rewards/task/mean" in curve.columns
    assert (dest / "metrics/rl_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    batches = sorted((dest / "data/rollouts").glob("rollout_*.parquet"))
    assert len(batches) == 4  # one rollout batch per step (num_iterations=1)
    first = pd.read_parquet(batches[0])
    assert len(first) == 2 * 2 and {"completion", "reward/task", "reward/format", "advantage", "seed"} <= set(
        first.columns
    )
    assert "| gain |" in (dest / "metrics/rl.md").read_text()
    assert "## Rollout batch 0" in (dest / "metrics/rl_samples.md").read_text()
    assert not (dest / "models/checkpoints/rl").exists()  # cleaned once adapter and rollouts are safe
    # eval: every model form answers the task's held-out questions, with intervals and deltas vs base
    models = json.loads((dest / "metrics/eval.json").read_text())["models"]
    # rl.start=tuned: the SFT adapter RL started from is scored too, and every form against it
    assert list(models) == [
        "base", "base_4bit", "base_4bit_sft", "base_4bit_adapter", "merged", "merged_int8_weight_only"
    ]  # fmt: skip
    for name, scores in models.items():
        assert {"task_accuracy", "task_reward", "task_answer_tokens", "task_pass_at_k"} <= set(scores), name
        assert len(scores["task_accuracy"]["ci95"]) == 2
    assert {"delta", "delta_ci95"} <= set(models["merged"]["task_accuracy"])
    assert {"delta_vs_start", "delta_vs_start_ci95"} <= set(models["base_4bit_adapter"]["task_pass_at_k"])
    assert "delta_vs_start" not in models["base_4bit_sft"]["task_accuracy"]  # itself
    assert "delta_vs_start" not in models["merged"]["perplexity"]  # task metrics only
    settings = json.loads((dest / "metrics/eval.json").read_text())["settings"]["task"]
    assert settings["starting_policy"] == "base_4bit_sft" and settings["sampled_questions"] == 16
    assert "Δ start" in (dest / "metrics/eval.md").read_text()


def test_the_mlflow_run_gets_each_steps_rewards_and_the_rollouts_as_a_table(reinforced):
    dest, _ = reinforced
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lmtune").experiment_id
    (run,) = [
        r
        for r in client.search_runs([experiment])
        if r.data.tags.get(tracking.PARAMS_HASH_TAG) == workspace_hash(dest)
    ]
    assert run.data.params["rl.method"] == "grpo"
    for metric in ("rl_loss", "reward", "rewards/task/mean", "completions/mean_length"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2, 3, 4], metric
    assert {"rl.held_out.accuracy.gain.value", "rl.final.reward"} <= set(run.data.metrics)
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "rl_rollouts.json")).read_text())
    assert {"completion", "reward", "advantage"} <= set(table["columns"]) and len(table["data"]) == 16


def test_replay_retrains_the_stored_adapter_from_the_rollouts_alone(reinforced):
    dest, _ = reinforced
    replayed = subprocess.run(
        [sys.executable, "-m", "lmtune.tools.replay"], cwd=dest, capture_output=True, text=True, timeout=600
    )
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    assert replayed.stdout.startswith("identical: ")


def test_rl_none_is_the_pipeline_as_it_was(reinforced):
    dest, _ = reinforced
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", cwd=dest)
    stages = sh("dvc", "stage", "list", "--name-only", cwd=dest).stdout.split()
    assert not [s for s in stages if s.startswith("rl")]
