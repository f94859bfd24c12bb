"""The whole pipeline through DVC on the smoke profile, in a temporary copy of the repo."""

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
from repo_copy import BIN, ROOT, SECRET, copy_repo, free_port, git, sh, wait_until_healthy
from safetensors.torch import load_file

from lmtune.cli.pipeline import snapshot
from lmtune.track import runs as tracking

ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots of the UI test (git-ignored)

TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
EXPECTED_FILES = {
    "models/base": {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "config.yaml",
        "source.json",
        *TOKENIZER,
    },
    "models/adapter": {
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.yaml",
        "README.md",
        *TOKENIZER,
    },  # no run id: see lmtune.track.runs
    "models/merged": {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "config.yaml",
        *TOKENIZER,
    },
    "models/quantized": {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "config.yaml",
        *TOKENIZER,
    },
    "data/processed": {"train.parquet", "validation.parquet", "test.parquet"},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh copy of the repository (tracked and new files), with the smoke profile composed and
    reproduced, and that state committed: `restored` brings every test back to it."""
    dest = copy_repo(tmp_path_factory.mktemp("repo"))
    sh(sys.executable, "-m", "lmtune.cli.params", "--force", "experiment=smoke", cwd=dest)
    repro = sh("dvc", "repro", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-qm", "the smoke profile, reproduced", cwd=dest)
    return dest, repro


@pytest.fixture(autouse=True)
def restored(repo):
    """After each test, the copy is as the fixture left it (params, dvc.lock, metrics, your data,
    models from DVC's cache), so the tests pass in any order. MLflow's store keeps every run."""
    yield
    dest, _ = repo
    if sh("git", "status", "--porcelain", cwd=dest).stdout.strip():
        sh("git", "checkout", "-q", "--", ".", cwd=dest)
        sh("git", "clean", "-fdq", cwd=dest)
    sh("dvc", "checkout", "--force", "-q", cwd=dest)


@pytest.fixture(scope="module")
def sweep(repo):
    """A queued sweep of two ranks, run by two DVC queue workers at once (ranks no other test runs:
    DVC's run-cache would restore, not rerun and log, stages it has seen)."""
    dest, _ = repo
    sh("dvc", "exp", "run", "--queue", "-S", "experiment=smoke", "-S", "lora.r=4,12", cwd=dest)
    sh("dvc", "exp", "run", "--run-all", "--jobs", "2", cwd=dest)  # two workers, one store
    return dest


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


def workspace_hash(dest) -> str:
    """The MLflow run identity of the configuration the copy's params.yaml holds."""
    from lmtune.config import load

    return tracking.params_hash(load(root=dest))


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
    assert run.data.tags["git_commit"] == ran_at
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
    "cli/runner.py",
]


def stages_using(edited: str) -> set[str]:
    from imports import PACKAGE, module_closure

    target = PACKAGE / edited
    part = target.parent if target.parent != PACKAGE else target
    return {
        script.stem
        for script in (ROOT / "stages").glob("*.py")
        if any(f == part or part in f.parents for f in module_closure(script, skip=("track", "cli")))
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
    assert set(json.loads(status)) == stages_using(edited), (edited, status)
    if edited.startswith("model/"):  # LoRA or loading code: the base (13 GB for Llama-2-7B) stays
        assert "base" not in json.loads(status)
    if edited.startswith(("track/", "cli/")):
        assert json.loads(status) == {}


def test_a_stage_failing_under_make_run_leaves_the_last_good_metrics(repo, tmp_path):
    """DVC removes a stage's outputs, git-tracked metrics/ too, before it runs the stage; what
    `make run` runs (lmtune.cli.pipeline) writes back what the failing stage lost: dvc.lock still
    describes those files, so metrics/ and dvc.lock agree again."""
    dest, _ = repo
    before = {name: (dest / name).read_bytes() for name in ("metrics/eval.json", "metrics/eval.md")}
    elsewhere = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # the module counts runs
    failed = sh(
        sys.executable,
        "-m",
        "lmtune.cli.pipeline",
        "experiment=smoke",
        "eval.generation_examples=5",
        cwd=dest,
        check=False,
        env=elsewhere,
    )
    assert failed.returncode != 0 and "bootstrap intervals need at least 10" in failed.stderr
    assert "put back" in failed.stderr and "metrics/eval.json" in failed.stderr
    assert {name: (dest / name).read_bytes() for name in before} == before
    alone = sh("dvc", "repro", cwd=dest, check=False, env=elsewhere)  # what plain DVC does
    assert alone.returncode != 0 and not (dest / "metrics/eval.json").exists()
    sh(sys.executable, "-m", "lmtune.cli.params", "--force", "experiment=smoke", cwd=dest)
    sh("dvc", "repro", cwd=dest)
    assert "up to date" in sh("dvc", "status", cwd=dest).stdout


def test_plots_page_renders_without_a_cdn(repo):
    dest, _ = repo
    template = sh(sys.executable, "-m", "lmtune.cli.plots", cwd=dest).stdout.strip()
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


def test_experiments_that_differ_only_in_quantize_get_their_own_complete_runs(repo):
    """Only quantize and eval run in the second experiment: its run still holds every stage's
    numbers (those DVC skipped included), none of the first run's quantized model, and the first
    run is left as it was."""
    dest, _ = repo
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lmtune").experiment_id
    before = client.search_runs([experiment])
    (first,) = [r for r in before if r.data.tags.get(tracking.PARAMS_HASH_TAG) == workspace_hash(dest)]
    done = sh("dvc", "exp", "run", "-S", "experiment=smoke", "-S", "quantize=int8_dynamic", cwd=dest)
    assert "Running stage 'finetune'" not in done.stdout and "Running stage 'eval'" in done.stdout
    (second,) = [
        r for r in client.search_runs([experiment]) if r.info.run_id not in {b.info.run_id for b in before}
    ]
    assert second.info.status == "FINISHED" and second.data.tags["dvc_experiment"]
    assert second.data.params["quantize.method"] == "int8_dynamic"
    assert client.get_run(first.info.run_id).data.metrics == first.data.metrics  # untouched
    for run, method in ((first, "int8_weight_only"), (second, "int8_dynamic")):
        families = {k.split(".")[0] for k in run.data.metrics}
        assert families >= {
            "prepare",
            "train",
            "merge",
            "quantize",
            "eval",
            "sample",
            "train_loss",
            "val_loss",
        }
        models = {k.split(".")[1] for k in run.data.metrics if k.startswith("eval.")}
        assert models == {"base", "base_4bit", "base_4bit_adapter", "merged", f"merged_{method}"}, models
    assert (
        len(client.get_metric_history(second.info.run_id, "train_loss")) == 6
    )  # from metrics/train_loss.csv
    files = {
        name: json.loads((dest / f"metrics/{name}.json").read_text())
        for name in ("quantize", "eval", "train")
    }
    # the second run's numbers are the workspace's files; training was shared
    assert second.data.metrics["quantize.size_ratio"] == pytest.approx(files["quantize"]["size_ratio"])
    merged = files["eval"]["models"]["merged_int8_dynamic"]["perplexity"]["value"]
    assert second.data.metrics["eval.merged_int8_dynamic.perplexity"] == pytest.approx(merged)
    assert second.data.metrics["train.final_val_loss"] == first.data.metrics["train.final_val_loss"]


def test_sigkill_during_finetune_then_repro_resumes_from_the_checkpoint(repo):
    dest, _ = repo
    sh(
        sys.executable,
        "-m",
        "lmtune.cli.params",
        "--force",
        "experiment=smoke",
        "train.max_steps=150",
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
    assert train["steps"] == 150 and train["resumed_from_step"] >= 5
    assert "up to date" in sh("dvc", "status", cwd=dest).stdout


def test_a_second_pipeline_is_refused_while_a_real_dvc_repro_runs(repo):
    """`make params` and `make run` in the same folder while `dvc repro` trains: both refuse before
    writing anything, so params.yaml, dvc.lock and MLflow keep describing what the stages ran."""
    dest, _ = repo
    long = ["experiment=smoke", "train.max_steps=400", "train.checkpoint_every=400", "train.eval_every=400"]
    sh(sys.executable, "-m", "lmtune.cli.params", "--force", *long, cwd=dest)
    before = (dest / "params.yaml").read_text()
    proc = background_repro(dest)
    try:
        rwlock, deadline = dest / ".dvc/tmp/rwlock", time.monotonic() + 120
        while "models/adapter" not in (rwlock.read_text() if rwlock.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "finetune did not start"
            time.sleep(0.2)
        for command in ("lmtune.cli.params", "lmtune.cli.pipeline"):
            second = sh(sys.executable, "-m", command, "experiment=smoke", "lora.r=2", cwd=dest, check=False)
            assert second.returncode == 2 and "a pipeline is running" in second.stderr, second.stderr
            assert "Traceback" not in second.stderr and (dest / "params.yaml").read_text() == before
        assert proc.poll() is None  # the first pipeline trained on, undisturbed
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(dest / "models/checkpoints", ignore_errors=True)


def test_dvc_exp_run_composes_conf_with_the_override(repo):
    """DVC composes conf/ itself, so the profile is passed too."""
    dest, _ = repo
    sh("dvc", "exp", "run", "-S", "experiment=smoke", "-S", "lora.r=8", cwd=dest)
    from omegaconf import OmegaConf

    params = OmegaConf.load(dest / "params.yaml")
    assert params.lora.r == 8 and params.model.name == "tiny_random"
    trainable = json.loads((dest / "metrics/train.json").read_text())["trainable_parameters"]
    assert trainable == 65536 // 2  # rank 16 → 8 halves the adapter
    shown = sh("dvc", "exp", "show", "--json", cwd=dest).stdout
    assert '"r": 8' in shown.replace(" ", "").replace('"r":8', '"r": 8')


def test_queued_sweep_lands_in_the_one_store_and_compares(sweep):
    """Queue workers run in temporary copies of the repo; their MLflow runs must still land in the
    user's mlflow.db, tagged with their DVC experiment name."""
    dest = sweep
    bad = sh(
        sys.executable,
        "-m",
        "lmtune.cli.params",
        "--validate-grid",
        "experiment=smoke",
        "lora.r=4,0",
        cwd=dest,
        check=False,
    )
    assert bad.returncode == 2 and "lora.r=0" in bad.stderr and "nothing was queued" in bad.stderr
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])
    queued = [
        r for r in runs if r.data.tags.get("dvc_experiment") and r.data.params.get("lora.r") in ("4", "12")
    ]
    assert len(queued) >= 2 and all(r.info.status == "FINISHED" for r in queued)
    # the first, unqueued run: every metric a pipeline logs (base and prepare did not rerun in the sweep)
    expected = {k for k in runs[-1].data.metrics if k not in ("wall_seconds.base", "wall_seconds.prepare")}
    for run in queued:  # concurrent workers lost no metric and no step of the loss curve
        assert set(expected) <= set(run.data.metrics), set(expected) - set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6
    assert not list((dest / ".dvc/tmp/exps").glob("**/mlflow.db"))  # no store left behind in a worker copy
    committed = snapshot(dest / "metrics")
    sh(sys.executable, "-m", "lmtune.track.compare", cwd=dest)
    assert snapshot(dest / "metrics") == committed  # the committed sweep page is rewritten only on request
    assert "reports/" in sh("git", "check-ignore", "-v", "reports/sweep.md", cwd=dest).stdout
    table = (dest / "reports/sweep.md").read_text()
    assert table.count("| tiny_random |") >= 3
    cells = [
        [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")
    ]
    wall = cells[0].index("wall s")  # every stage's wall time, summed per run
    assert all(float(row[wall]) > 0 for row in cells[2:] if "tiny_random" in row)
    for name in ("quality_vs_rank.png", "quality_vs_memory.png", "loss_curves.png"):
        assert (dest / "reports/plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_exp_apply_then_repro_reproduces_that_experiments_metrics(sweep):
    """Bring one queued experiment back into the workspace and recompute its evaluation from its
    own outputs: the same numbers."""
    dest = sweep
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmtune").experiment_id])
    name = next(
        r.data.tags["dvc_experiment"]
        for r in runs
        if r.data.tags.get("dvc_experiment") and r.data.params.get("lora.r") == "4"
    )
    sh("dvc", "exp", "apply", name, cwd=dest)
    assert json.loads((dest / "metrics/train.json").read_text())["trainable_parameters"] == 65536 // 4
    assert "Running stage" not in sh("dvc", "repro", cwd=dest).stdout
    before = json.loads((dest / "metrics/eval.json").read_text())["models"]
    sh("dvc", "repro", "--force", "--single-item", "eval", cwd=dest)  # what `make eval` does
    after = json.loads((dest / "metrics/eval.json").read_text())["models"]
    values = lambda models: {(n, m): v["value"] for n, ms in models.items() for m, v in ms.items()}  # noqa: E731
    assert values(after) == pytest.approx(values(before), rel=1e-6)


def test_mlflow_ui_shows_the_sweep_runs_in_a_real_browser(repo, sweep):
    """Headless Chromium opens the MLflow UI on 127.0.0.1 and finds the
    sweep's runs, then one run's params and metrics. Screenshots go to tests/artifacts/."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    import mlflow
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    dest, _ = repo
    store = f"sqlite:///{dest / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("lmtune")
    sweep = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("dvc_experiment")]
    assert len(sweep) >= 2
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "ui",
            "--backend-store-uri",
            store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        wait_until_healthy(url, server)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(driver), options=options)
        try:

            def page_shows(*texts):
                return lambda b: all(t in b.find_element(By.TAG_NAME, "body").text for t in texts)

            browser.get(f"{url}/#/experiments/{experiment.experiment_id}/runs")
            WebDriverWait(browser, 60).until(page_shows(*(r.info.run_name for r in sweep)))
            browser.save_screenshot(str(ARTIFACTS / "mlflow_ui_runs.png"))
            run = sweep[0]
            browser.get(f"{url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
            for placeholder, key in (
                ("Search metrics", "eval.merged.perplexity"),
                ("Search parameters", "lora.r"),
            ):
                box = WebDriverWait(browser, 60).until(
                    lambda b, p=placeholder: b.find_element(By.CSS_SELECTOR, f"input[placeholder='{p}']")
                )
                box.send_keys(key)
            value = f"{run.data.metrics['eval.merged.perplexity']:.4f}"[:5]  # the UI rounds: compare a prefix
            WebDriverWait(browser, 60).until(page_shows("eval.merged.perplexity", "lora.r", value))
            browser.save_screenshot(str(ARTIFACTS / "mlflow_ui_run.png"))
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_hydra_multirun_on_finetune_writes_each_job_apart(repo):
    dest, _ = repo
    adapter = (dest / "models/adapter/adapter_model.safetensors").read_bytes()
    run = sh(
        sys.executable,
        "stages/finetune.py",
        "--multirun",
        "lora.r=2,6",
        "train.max_steps=3",
        "train.eval_every=1",
        cwd=dest,
    )
    jobs = sorted((dest / "multirun").glob("*/*/[0-9]"))
    assert len(jobs) == 2, run.stdout
    from safetensors.torch import load_file

    for job, rank in zip(jobs, (2, 6), strict=True):
        weights = load_file(job / "adapter/adapter_model.safetensors")
        assert {t.shape[0] for n, t in weights.items() if "lora_A" in n} == {rank}
        assert json.loads((job / "metrics/train.json").read_text())["steps"] == 3
        assert "lora.r=" in (job / ".hydra/overrides.yaml").read_text()
    assert (dest / "models/adapter/adapter_model.safetensors").read_bytes() == adapter  # pipeline untouched
    bad = sh(sys.executable, "stages/merge.py", "--multirun", "merge.dtype=fp32,bf16", cwd=dest, check=False)
    assert bad.returncode == 2 and "make sweep" in bad.stderr


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
        "lmtune.cli.params",
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
        assert {"exact_match", "answer_f1"} <= set(models[name]), name
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
        "lmtune.cli.params",
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


def test_dvc_exp_run_without_the_profile_of_the_last_run_is_refused_with_the_command(repo):
    """After a smoke run, `dvc exp run -S lora.r=5` would compose the full default (DVC knows only
    the -S values): the first stage stops before any work and names the command that keeps smoke."""
    dest, _ = repo
    sh(sys.executable, "-m", "lmtune.cli.params", "--force", "experiment=smoke", cwd=dest)
    refused = sh("dvc", "exp", "run", "-S", "lora.r=5", cwd=dest, check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "without experiment=smoke" in said, said[-2000:]
    assert "dvc exp run -S experiment=smoke -S lora.r=5" in said and "Traceback" not in said


def test_a_smoke_run_leaves_the_workspace_results_alone(repo):
    """`make run ARGS=experiment=smoke` where the workspace holds the default: a DVC experiment in a
    temporary copy; params.yaml, dvc.lock and metrics/ here do not change, MLflow has its run."""
    dest, _ = repo
    sh(sys.executable, "-m", "lmtune.cli.params", "--force", cwd=dest)  # the workspace: the default
    before = {
        **snapshot(dest / "metrics"),
        **{p: p.read_bytes() for p in (dest / "params.yaml", dest / "dvc.lock")},
    }
    smoke = sh(
        sys.executable, "-m", "lmtune.cli.pipeline", "experiment=smoke", "lora.r=7", cwd=dest
    )  # a rank no other test runs
    assert "run as a DVC experiment in a temporary copy" in smoke.stdout
    after = {
        **snapshot(dest / "metrics"),
        **{p: p.read_bytes() for p in (dest / "params.yaml", dest / "dvc.lock")},
    }
    assert after == before
    shown = json.dumps(json.loads(sh("dvc", "exp", "show", "--json", cwd=dest).stdout))
    assert '"r": 7' in shown
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{dest / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("lmtune").experiment_id], "params.`lora.r` = '7'"
    )
    assert len(runs) == 1 and runs[0].data.tags.get("dvc_experiment")
    assert runs[0].info.status == "FINISHED" and "eval.merged.perplexity" in runs[0].data.metrics


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
