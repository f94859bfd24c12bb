"""The whole pipeline through DVC on the smoke profile, in a temporary copy of the repo: outputs,
metrics, MLflow, reruns and the cache, failures and kills, your own data and models."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from repo_copy import BIN, ROOT, SECRET, restore, sh, workspace_hash
from safetensors.torch import load_file

from lmtune.track import runs as tracking

TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
EXPECTED_FILES = {
    "models/base": {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "config.yaml",
        "source.json",
        "provenance.json",
        *TOKENIZER,
    },
    "models/adapter": {
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.yaml",
        "README.md",
        "provenance.json",
        *TOKENIZER,
    },  # no run id: see lmtune.track.runs
    "models/merged": {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "config.yaml",
        "provenance.json",
        *TOKENIZER,
    },
    "models/quantized": {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "config.yaml",
        "provenance.json",
        *TOKENIZER,
    },
    "data/processed": {"train.parquet", "validation.parquet", "test.parquet", "provenance.json"},
}


@pytest.fixture(autouse=True)
def restored(repo):
    yield
    restore(repo[0])


def background_repro(dest) -> subprocess.Popen:
    """`dvc repro` in the copy, in its own process group (so a test can kill dvc and its stage)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.Popen(
        ["dvc", "repro"],
        cwd=dest,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_every_stage_ran_and_wrote_exactly_its_outputs(repo):
    dest, repro = repo
    assert SECRET not in repro.stdout + repro.stderr
    for noise in ("Failed to load", "natively supported", "is_gradient_checkpointing"):  # third-party noise
        assert noise not in repro.stderr, noise
    for stage in ("base", "prepare", "finetune", "merge", "quantize", "eval", "sample"):
        assert f"Running stage '{stage}'" in repro.stdout
    for directory, expected in EXPECTED_FILES.items():
        assert {p.name for p in (dest / directory).iterdir()} == expected, directory
    for name in (
        "prepare.json",
        "train.json",
        "merge.json",
        "eval.json",
        "eval.md",
        "quantize.json",
        "sample.json",
        "samples.jsonl",
        "samples.md",
        "train_loss.csv",
        "val_loss.csv",
    ):
        assert (dest / "metrics" / name).stat().st_size > 0, name
    assert not (dest / "models/checkpoints").exists()  # cleaned once the adapter is safe


def test_every_output_says_what_made_it_without_changing_what_dvc_hashes(repo):
    """provenance.json in each output folder and metrics/made_by/<stage>.json: the stage's config,
    library versions, the commit and whether the tree was dirty, the machine. DVC ignores the file
    (.dvcignore): rewriting it changes no output's hash and reruns nothing."""
    import torch

    dest, _ = repo
    # the template ran its stages on the copy's first commit with params.yaml recomposed, not yet
    # committed: a dirty tree
    ran_at = sh("git", "rev-parse", "HEAD~1", cwd=dest).stdout.strip()
    for folder, stage in (
        ("models/base", "base"),
        ("data/processed", "prepare"),
        ("models/adapter", "finetune"),
        ("models/merged", "merge"),
        ("models/quantized", "quantize"),
    ):
        made = json.loads((dest / folder / "provenance.json").read_text())
        assert made == json.loads((dest / "metrics/made_by" / f"{stage}.json").read_text())
        assert made["stage"] == stage and made["git"] == {
            "commit": ran_at,
            "dirty": True,
            "changed": ["params.yaml"],
        }
        assert made["llama_cpp"]["cflags"] == "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        assert made["versions"]["torch"] == torch.__version__ and made["host"]["cores"] >= 1
    assert json.loads((dest / "models/adapter/provenance.json").read_text())["config"]["lora"]["r"] == 16
    for stage in ("eval", "sample"):
        assert (dest / "metrics/made_by" / f"{stage}.json").is_file()
    (dest / "models/merged/provenance.json").write_text("{}")  # edited by hand: DVC does not care
    assert "up to date" in sh("dvc", "status", cwd=dest).stdout


def test_every_metric_is_finite_and_training_changed_the_model(repo):
    dest, _ = repo
    numbers = []

    def collect(value):
        if isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers.append(value)

    for name in ("prepare", "train", "merge", "quantize", "eval", "sample"):
        collect(json.loads((dest / "metrics" / f"{name}.json").read_text()))
    assert numbers and all(math.isfinite(n) for n in numbers)
    evaluation = json.loads((dest / "metrics/eval.json").read_text())
    models = evaluation["models"]
    assert list(models) == ["base", "base_4bit", "base_4bit_adapter", "merged", "merged_int8_weight_only"]
    assert models["base"]["perplexity"]["value"] != models["merged"]["perplexity"]["value"]
    for name, metrics in models.items():
        assert set(metrics) == {"perplexity", "token_accuracy", "rouge1", "rouge2", "rougeL", "bleu"}
        for entry in metrics.values():
            lo, hi = entry["ci95"]
            assert lo <= entry["value"] <= hi or math.isclose(lo, hi)
            assert ("delta" in entry) == (name != "base")
    assert evaluation["settings"]["tokens_scored"] > 0
    train = json.loads((dest / "metrics/train.json").read_text())
    assert train["lora_matrices_unchanged"] == 0 and train["steps"] == 6
    # lora_B starts at zero: every one must have moved, validations ran in between
    adapter = load_file(dest / "models/adapter/adapter_model.safetensors")
    lora_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert len(lora_b) == train["lora_matrices"] // 2 and all(t.abs().sum() > 0 for t in lora_b)
    assert len(pd.read_csv(dest / "metrics/val_loss.csv")) == 2  # steps 3 and 6


def test_merged_logits_equal_base_plus_adapter(repo):
    merge = json.loads((repo[0] / "metrics/merge.json").read_text())
    assert merge["max_logit_diff"] < 1e-4 and merge["check_tokens"] > 0


def test_samples_page_shows_both_models_side_by_side(repo):
    dest, _ = repo
    page = (dest / "metrics/samples.md").read_text()
    assert "| Prompt | Reference | Base model | Fine-tuned |" in page and "HAMLET:" in page
    rows = [json.loads(line) for line in (dest / "metrics/samples.jsonl").read_text().splitlines()]
    assert sorted({r["model"] for r in rows}) == ["base", "merged"] and len(rows) == 4


def test_one_mlflow_run_holds_params_metrics_and_artifacts(repo):
    dest, _ = repo
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])
    (run,) = [r for r in runs if r.data.tags.get(tracking.PARAMS_HASH_TAG) == workspace_hash(dest)]  # one
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["lmtune.params_hash"] and "dvc_experiment" not in run.data.tags  # plain dvc repro
    assert run.data.params["lora.r"] == "16" and run.data.params["model.name"] == "tiny_random"
    for key in (
        "train.final_val_loss",
        "merge.max_logit_diff",
        "eval.merged.perplexity",
        "eval.base.perplexity",
        "sample.merged_tokens_per_second",
        "prepare.train.sequences",
        "eval.merged_int8_weight_only.generated_tokens_per_second",
    ):
        assert key in run.data.metrics, key
    for stage in ("base", "prepare", "finetune", "merge", "quantize", "eval", "sample"):  # wall times
        assert run.data.metrics[f"wall_seconds.{stage}"] > 0, stage
    assert len(client.get_metric_history(run_id, "train_loss")) == 6
    assert {a.path for a in client.list_artifacts(run_id)} == {"metrics", "adapter", "base"}
    reports = {a.path.removeprefix("metrics/") for a in client.list_artifacts(run_id, "metrics")}
    assert {"samples.md", "eval.md", "train.json", "eval.json", "train_loss.csv"} <= reports
    ran_at = sh("git", "rev-parse", "HEAD~1", cwd=dest).stdout.strip()  # the fixture committed after the run
    assert run.data.tags["git_commit"] == ran_at and run.data.tags["git_dirty"] == "true"
    import torch

    assert run.data.tags["version.torch"] == torch.__version__
    assert json.loads(run.data.tags["host"])["cores"] >= 1
    logged = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in logged and SECRET not in (dest / "params.yaml").read_text()


def test_second_repro_runs_nothing_and_status_is_clean(repo):
    dest, _ = repo
    again = sh("dvc", "repro", cwd=dest)
    assert "Running stage" not in again.stdout
    assert "up to date" in sh("dvc", "status", cwd=dest).stdout


def test_an_adapter_trained_twice_has_the_same_dvc_hash(repo):
    """Same code, params, data and seed: byte-equal outputs, so DVC's cache and run-cache hold."""
    dest, _ = repo

    def adapter_hash():
        lock = (dest / "dvc.lock").read_text()
        return lock.split("path: models/adapter\n", 2)[1].split("md5: ", 1)[1].split("\n", 1)[0]

    before = adapter_hash()
    rerun = sh("dvc", "repro", "--force", "--single-item", "finetune", cwd=dest)
    assert "Running stage 'finetune'" in rerun.stdout
    assert adapter_hash() == before
    assert "up to date" in sh("dvc", "status", cwd=dest).stdout  # nothing downstream needs a rerun


# one file of each part of the package, and the stages whose scripts import that part (read from
# the imports, not from dvc.yaml): an edit there must make `dvc status` report exactly those
EDITED = [
    "config.py",
    "artifacts.py",
    "checkpoint.py",
    "base/tiny.py",
    "data/sources.py",
    "model/lora.py",
    "model/load.py",
    "train/kernels.py",
    "evaluate/scores.py",
    "export/gguf.py",
    "track/compare.py",
    "pipeline/runner.py",
    "tools/serve.py",
]


def stages_using(edited: str) -> set[str]:
    from imports import PACKAGE, module_closure

    target = PACKAGE / edited
    part = target.parent if target.parent != PACKAGE else target
    return {
        script.stem
        for script in (ROOT / "stages").glob("*.py")
        if any(
            f == part or part in f.parents
            for f in module_closure(script, skip=("track", "pipeline", "tools"))
        )
    }


@pytest.mark.parametrize("edited", EDITED)
def test_editing_code_reruns_only_the_stages_that_use_it(repo, edited):
    dest, _ = repo
    path = dest / "src/lmtune" / edited
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        status = sh("dvc", "status", "--json", cwd=dest).stdout
    finally:
        path.write_text(original)
    # the stages of this configuration: align's exist only when align != none
    existing = {
        line.split("@")[0] for line in sh("dvc", "stage", "list", "--name-only", cwd=dest).stdout.split()
    }
    assert set(json.loads(status)) == stages_using(edited) & existing, (edited, status)
    if edited.startswith("model/"):  # LoRA or loading code: the base (13 GB for Llama-2-7B) stays
        assert "base" not in json.loads(status)
    if edited.startswith(("track/", "pipeline/", "tools/")):
        assert json.loads(status) == {}


def test_a_stage_failing_under_make_run_leaves_the_last_good_metrics(repo, tmp_path):
    """DVC removes a stage's outputs, git-tracked metrics/ too, before it runs the stage; what
    `make run` runs (lmtune.pipeline.repro) writes back what the failing stage lost: dvc.lock still
    describes those files, so metrics/ and dvc.lock agree again."""
    dest, _ = repo
    before = {name: (dest / name).read_bytes() for name in ("metrics/eval.json", "metrics/eval.md")}
    elsewhere = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # the module counts runs
    failed = sh(
        sys.executable,
        "-m",
        "lmtune.pipeline.repro",
        "experiment=smoke",
        "eval.prompt_tokens=1000",  # longer than every test passage: eval fails at its start
        cwd=dest,
        check=False,
        env=elsewhere,
    )
    assert failed.returncode != 0 and "no test example to generate from" in failed.stderr
    assert "put back" in failed.stderr and "metrics/eval.json" in failed.stderr
    assert {name: (dest / name).read_bytes() for name in before} == before
    alone = sh("dvc", "repro", cwd=dest, check=False, env=elsewhere)  # what plain DVC does
    assert alone.returncode != 0 and not (dest / "metrics/eval.json").exists()
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", cwd=dest)
    sh("dvc", "repro", cwd=dest)
    assert "up to date" in sh("dvc", "status", cwd=dest).stdout


def test_plots_page_renders_without_a_cdn(repo):
    dest, _ = repo
    template = sh(sys.executable, "-m", "lmtune.tools.plots", cwd=dest).stdout.strip()
    sh("dvc", "plots", "show", "--html-template", template, "-o", "plots_out", cwd=dest)
    page = (dest / "plots_out/index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page and "train_loss.csv" in page
    assert page.count("<script>") >= 3  # vega, vega-lite and vega-embed inlined


def test_a_stage_override_by_hand_and_a_bad_key_before_any_work(repo):
    dest, _ = repo
    bad = sh(sys.executable, "stages/finetune.py", "lora.rank=8", cwd=dest, check=False)
    assert bad.returncode == 2 and "lora.rank" in bad.stderr and "Traceback" not in bad.stderr
    wrong = sh(sys.executable, "stages/finetune.py", "lora.r=many", cwd=dest, check=False)
    assert wrong.returncode == 2 and "lora.r" in wrong.stderr


def test_sigkill_during_finetune_then_repro_resumes_from_the_checkpoint(repo):
    dest, _ = repo
    sh(
        sys.executable,
        "-m",
        "lmtune.pipeline.params",
        "--force",
        "experiment=smoke",
        "train.max_steps=40",  # the kill lands at the first checkpoint, long before the end
        "train.checkpoint_every=5",
        "train.eval_every=50",
        cwd=dest,
    )
    proc = background_repro(dest)
    checkpoints = dest / "models/checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: dvc and the stage script
    proc.wait()
    assert list(checkpoints.glob("step-*")), "no checkpoint was written before the kill"
    assert not (dest / "models/adapter").exists()  # nothing DVC could take as complete
    assert "finetune" in sh("dvc", "status", cwd=dest).stdout
    sh("dvc", "repro", cwd=dest)
    train = json.loads((dest / "metrics/train.json").read_text())
    assert train["steps"] == 40 and train["resumed_from_step"] >= 5
    assert "up to date" in sh("dvc", "status", cwd=dest).stdout


def test_a_second_pipeline_is_refused_while_a_real_dvc_repro_runs(repo):
    """`make params` and `make run` in the same folder while `dvc repro` trains: both refuse before
    writing anything, so params.yaml, dvc.lock and MLflow keep describing what the stages ran."""
    dest, _ = repo
    long = ["experiment=smoke", "train.max_steps=400", "train.checkpoint_every=400", "train.eval_every=400"]
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", *long, cwd=dest)
    before = (dest / "params.yaml").read_text()
    proc = background_repro(dest)
    try:
        rwlock, deadline = dest / ".dvc/tmp/rwlock", time.monotonic() + 120
        while "models/adapter" not in (rwlock.read_text() if rwlock.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "finetune did not start"
            time.sleep(0.2)
        for command in ("lmtune.pipeline.params", "lmtune.pipeline.repro"):
            second = sh(sys.executable, "-m", command, "experiment=smoke", "lora.r=2", cwd=dest, check=False)
            assert second.returncode == 2 and "a pipeline is running" in second.stderr, second.stderr
            assert "Traceback" not in second.stderr and (dest / "params.yaml").read_text() == before
        assert proc.poll() is None  # the first pipeline trained on, undisturbed
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(dest / "models/checkpoints", ignore_errors=True)


CHATS = [  # a user's own chat data: some multi-turn, some with a system prompt
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a + b}"},
        ]
    }
    for a in range(12)
    for b in range(12)
] + [
    {
        "messages": [
            {"role": "system", "content": "Answer in words."},
            {"role": "user", "content": f"Double {a}?"},
            {"role": "assistant", "content": f"It is {2 * a}."},
            {"role": "user", "content": "And half?"},
            {"role": "assistant", "content": f"Half of {a} is {a / 2}."},
        ]
    }
    for a in range(40)
]


def test_your_own_chat_data_trains_on_answers_is_judged_on_answers_and_versioned(repo):
    """The user's JSONL of messages in data/own/, through the whole pipeline; then an edit to it
    makes prepare (and what follows, not base) out of date."""
    dest, _ = repo
    data = dest / "data/own/chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    sh(
        sys.executable,
        "-m",
        "lmtune.pipeline.params",
        "--force",
        "experiment=smoke",
        "data=files",
        "data.format=chat",
        "data.files=[data/own/chats.jsonl]",
        "data.test_fraction=0.1",
        cwd=dest,
    )
    sh("dvc", "repro", cwd=dest)
    prepared = json.loads((dest / "metrics/prepare.json").read_text())
    assert prepared["format"] == "chat" and prepared["rows"] == len(CHATS)
    train = pd.read_parquet(dest / "data/processed/train.parquet")
    assert all(0 < sum(m) < len(m) for m in train["loss_mask"])  # answers learned, prompts not
    models = json.loads((dest / "metrics/eval.json").read_text())["models"]
    for name in ("base", "merged"):
        assert {"exact_match", "answer_f1", "answer_tokens"} <= set(models[name]), name
        assert 0 < models[name]["answer_tokens"]["value"] <= 64  # eval.reference_tokens at most
        lo, hi = models[name]["answer_f1"]["ci95"]
        assert lo <= models[name]["answer_f1"]["value"] <= hi
    page = (dest / "metrics/samples.md").read_text()
    assert "What is" in page or "Double" in page  # the test split's questions, not Shakespeare's prompts
    assert "HAMLET" not in page
    data.write_text(data.read_text().replace("It is", "That is"))
    changed = set(json.loads(sh("dvc", "status", "--json", cwd=dest).stdout))
    assert "prepare" in changed and "base" not in changed


def test_a_local_model_folder_is_a_dependency_and_base_records_its_files(repo, tmp_path):
    """model.source=local: DVC hashes the folder itself, so an edit there rebuilds models/base."""
    dest, _ = repo
    local = tmp_path / "my-model"
    shutil.copytree(dest / "models/base", local)
    sh(
        sys.executable,
        "-m",
        "lmtune.pipeline.params",
        "--force",
        "experiment=smoke",
        "model.source=local",
        f"model.path={local}",
        cwd=dest,
    )
    from omegaconf import OmegaConf

    assert OmegaConf.load(dest / "params.yaml").model.dependency == str(local)  # set by make params
    sh("dvc", "repro", "base", cwd=dest)
    assert json.loads(sh("dvc", "status", "--json", "base", cwd=dest).stdout) == {}
    first = json.loads((dest / "models/base/source.json").read_text())["source_sha256"]
    generation = json.loads((local / "generation_config.json").read_text())
    (local / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.5}))
    status = json.loads(sh("dvc", "status", "--json", "base", cwd=dest).stdout)
    assert status == {"base": [{"changed deps": {str(local): "modified"}}]}
    sh("dvc", "repro", "base", cwd=dest)
    second = json.loads((dest / "models/base/source.json").read_text())["source_sha256"]
    assert {name for name in first if first[name] != second[name]} == {"generation_config.json"}


def test_a_copied_project_keeps_its_mlflow_artifacts_in_its_own_folder(repo, tmp_path):
    """MLflow stores absolute artifact locations; a copy of the project must not write into the
    original's mlartifacts/."""
    dest, _ = repo
    moved = tmp_path / "moved"
    shutil.copytree(dest, moved, symlinks=True)
    synced = sh(sys.executable, "-m", "lmtune.track.runs", cwd=moved)
    assert "the project was copied or moved" in synced.stderr
    run_id = synced.stdout.split()[2]
    import mlflow

    here = mlflow.MlflowClient(f"sqlite:///{moved / 'mlflow.db'}")
    assert here.get_experiment_by_name("lmtune").artifact_location == (moved / "mlartifacts").as_uri()
    assert here.get_run(run_id).info.artifact_uri.startswith((moved / "mlartifacts").as_uri())
    assert (moved / "mlartifacts" / run_id / "artifacts/base/source.json").is_file()
    original = mlflow.MlflowClient(f"sqlite:///{dest / 'mlflow.db'}")
    assert original.get_experiment_by_name("lmtune").artifact_location == (dest / "mlartifacts").as_uri()
    again = sh(sys.executable, "-m", "lmtune.track.runs", cwd=moved)
    assert "copied or moved" not in again.stderr  # rewritten once


def test_benchmarks_run_on_every_model_and_a_gate_too_tight_fails_after_writing_them(repo):
    """lm-eval's tasks through the eval stage: one row per (task, model) with an interval and the
    delta vs base; a gate the int4 form cannot meet stops the stage, its results already written."""
    dest, _ = repo
    int4 = ["quantize.method=int4_weight_only", "quantize.group_size=128"]  # one scale per row: coarse
    sh(sys.executable, "stages/quantize.py", *int4, cwd=dest)
    benchmarks = [
        "eval.benchmarks=[lmtune_test_bpb,lmtune_chatterbot_mc]",
        "eval.benchmark_limit=16",
        "eval.benchmark_models=[base,quantized_base,adapter,merged,quantized]",
    ]
    gate = "eval.gate={task: lmtune_test_bpb, metric: bits_per_byte, max_drop: 0.0}"
    failed = sh(sys.executable, "stages/eval.py", *int4, *benchmarks, gate, cwd=dest, check=False)
    metrics = json.loads((dest / "metrics/eval.json").read_text())
    bpb = {
        name: tasks["lmtune_test_bpb"]["bits_per_byte"]["value"]
        for name, tasks in metrics["benchmarks"].items()
    }
    ppl = {name: m["perplexity"]["value"] for name, m in metrics["models"].items()}
    quantized = json.loads((dest / "metrics/quantize.json").read_text())
    assert bpb["merged_int4_weight_only"] > bpb["merged"], (bpb, ppl, quantized)  # what the gate must see
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert "eval.gate failed: merged_int4_weight_only loses" in failed.stderr
    assert set(metrics["benchmarks"]) == set(metrics["models"])  # every model the stage scores
    for tasks in metrics["benchmarks"].values():
        for task, metric in (("lmtune_test_bpb", "bits_per_byte"), ("lmtune_chatterbot_mc", "acc")):
            entry, base = tasks[task][metric], metrics["benchmarks"]["base"][task][metric]
            assert entry["low"] <= entry["value"] <= entry["high"]
            assert entry["delta"] == pytest.approx(entry["value"] - base["value"])
            assert entry["delta_vs"] == "base"
    assert "| lmtune_chatterbot_mc | acc | merged |" in (dest / "metrics/eval.md").read_text()


def test_the_likelihood_benchmark_times_every_model_form_both_ways(repo, tmp_path):
    """bench/likelihood.py (make bench's eval rows) on the smoke models: each transformers form of
    the eval stage, the separate head against whole-batch logits, the same numbers."""
    dest, _ = repo
    out = tmp_path / "likelihood.json"
    sh(sys.executable, "bench/likelihood.py", "--passages", "12", "--out", out, cwd=dest)
    result = json.loads(out.read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["base", "base_4bit", "base_4bit_adapter", "merged", "merged_int8_weight_only"]
    for row in rows.values():
        assert row["tokens"] > 0 and row["tokens_per_second"] > 0 and row["share_of_matmul_peak"] > 0
        assert row["perplexity_relative_difference"] < 1e-3, row
    assert result["matmul_bf16_gflops"] > 0
