"""Preference tuning as pipeline stages, on the smoke profile in a temporary copy of the repo:
align=dpo adds the reference and align stages after finetune and merge takes the tuned adapter;
the MLflow run gets the steps' numbers; a new beta or method reruns the training, never the
reference; align=none is the pipeline as it was."""

import json
import sys

import mlflow
import pytest
import yaml
from repo_copy import restore, sh, workspace_hash

from lmtune.track import runs as tracking


@pytest.fixture(scope="module")
def aligned(repo):
    """The smoke pipeline with align=dpo on top of the reproduced SFT, and what `dvc repro` printed."""
    dest, _ = repo
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", "align=dpo", cwd=dest)
    return dest, sh("dvc", "repro", cwd=dest).stdout


def test_dpo_runs_after_the_sft_it_starts_from_and_merge_takes_its_adapter(aligned):
    dest, printed = aligned
    assert "Running stage 'finetune'" not in printed  # the SFT adapter is reused
    for stage in ("reference@sft", "align@dpo", "merge", "eval", "sample"):
        assert f"Running stage '{stage}'" in printed
    lock = yaml.safe_load((dest / "dvc.lock").read_text())["stages"]
    assert "models/aligned" in {d["path"] for d in lock["merge"]["deps"]}
    assert "data/pairs" in {d["path"] for d in lock["align@dpo"]["deps"]}
    result = json.loads((dest / "metrics/align.json").read_text())
    assert result["steps"] == 6 and result["method"] == "dpo" and result["packed"]
    held_out = result["held_out"]
    reference = json.loads((dest / "metrics/reference.json").read_text())
    # the reference's implicit reward against itself is zero; the tuned adapter's is not
    assert held_out["reference"]["mean_reward_margin"]["value"] == 0
    assert held_out["aligned"]["mean_reward_margin"]["value"] != 0
    assert set(held_out) == {"base", "reference", "aligned"}
    page = (dest / "metrics/align.md").read_text()
    assert "| aligned | " in page and "| reference | 0." in page
    # eval scores every model form on the held-out pairs, the SFT adapter it started from among them
    evaluated = json.loads((dest / "metrics/eval.json").read_text())
    models = evaluated["models"]
    assert list(models) == [
        "base",
        "base_4bit",
        "base_4bit_sft",
        "base_4bit_adapter",
        "merged",
        "merged_int8_weight_only",
    ]
    assert evaluated["settings"]["held_out_preference_pairs"] == reference["pairs"]["test"]
    for name, scores in models.items():
        assert {"preference_accuracy", "preference_accuracy_per_token", "preference_margin"} <= set(scores), (
            name
        )
    assert models["base_4bit_sft"]["reward_accuracy"]["value"] == 0  # the start against itself
    assert models["base_4bit_adapter"]["reward_accuracy"]["value"] > 0
    assert reference["pairs"]["test"] >= 10 and reference["pairs"]["train"] > 100
    assert sorted(p.name for p in (dest / "data/pairs").iterdir()) == [
        "config.yaml",
        "provenance.json",
        "test.parquet",
        "train.parquet",
    ]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lmtune").experiment_id
    (run,) = [
        r
        for r in client.search_runs([experiment])
        if r.data.tags.get(tracking.PARAMS_HASH_TAG) == workspace_hash(dest)
    ]
    assert run.data.params["align.method"] == "dpo"
    steps = client.get_metric_history(run.info.run_id, "rewards/accuracies")
    assert [m.step for m in steps] == [1, 2, 3, 4, 5, 6]
    assert {"align.held_out.aligned.preference_accuracy.value", "reference.pairs.test"} <= set(
        run.data.metrics
    )


@pytest.mark.parametrize("change", [["align=dpo", "align.beta=0.3"], ["align=ipo"]], ids=["beta", "method"])
def test_a_new_beta_or_method_retrains_but_never_rescores_the_reference(aligned, change):
    dest, _ = aligned
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", *change, cwd=dest)
    printed = sh("dvc", "repro", "merge", cwd=dest).stdout  # what follows merge is the SFT pipeline's
    assert "Running stage 'reference@sft'" not in printed
    assert "Running stage 'align@" in printed and "Running stage 'merge'" in printed
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", "align=dpo", cwd=dest)
    sh("dvc", "repro", cwd=dest)  # back to the module's state: restored from DVC's run cache


def test_kto_rescores_the_reference_as_unpaired_examples_and_trains_on_them(aligned):
    """KTO trains on examples (each pair split into a desirable and an undesirable one, each with a
    KL completion of another prompt), so the switch rescores the reference; held-out pairs stay pairs."""
    import pandas as pd

    dest, _ = aligned
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", "align=kto", cwd=dest)
    printed = sh("dvc", "repro", "align@kto", cwd=dest).stdout
    assert "Running stage 'reference@sft'" in printed and "Running stage 'align@kto'" in printed
    train = pd.read_parquet(dest / "data/pairs/train.parquet")
    assert {"completion_ids", "kl_ids", "label", "reference_completion", "reference_kl"} <= set(train)
    assert train["label"].any() and not train["label"].all()
    assert "chosen_ids" in pd.read_parquet(dest / "data/pairs/test.parquet")
    result = json.loads((dest / "metrics/align.json").read_text())
    assert result["method"] == "kto" and "kl" in result["final"]
    assert result["held_out"]["aligned"]["preference_accuracy"]["value"] > 0
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", "align=dpo", cwd=dest)
    sh("dvc", "repro", cwd=dest)  # back to the module's state: restored from DVC's run cache


def test_align_none_is_the_pipeline_as_it_was(repo, aligned):
    dest, _ = aligned
    restore(dest)  # the smoke profile as committed: align=none
    stages = sh("dvc", "stage", "list", cwd=dest).stdout
    assert "reference" not in stages and "align" not in stages
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=dest).stdout
