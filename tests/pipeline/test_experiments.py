"""DVC experiments on the smoke profile, in a temporary copy of the repo: `dvc exp run` composing
conf/, experiments that share stages, a queued sweep run by two workers into one MLflow store, its
comparison and the MLflow UI in a browser, Hydra's multirun, and `make run` of another profile."""

import json
import shutil
import sys

import pytest
from repo_copy import ARTIFACTS, mlflow_serving, restore, sh, workspace_hash

from lmtune.pipeline.repro import snapshot
from lmtune.track import runs as tracking


@pytest.fixture(autouse=True)
def restored(repo):
    yield
    restore(repo[0])


@pytest.fixture(scope="module")
def sweep(repo):
    """A queued sweep of two ranks, run by two DVC queue workers at once (ranks no other test runs:
    DVC's run-cache would restore, not rerun and log, stages it has seen)."""
    dest, _ = repo
    sh("dvc", "exp", "run", "--queue", "-S", "experiment=smoke", "-S", "lora.r=4,12", cwd=dest)
    run = sh(
        sys.executable, "-m", "lmtune.tools.sweep", "--jobs", "2", "--timeout", "1200", cwd=dest
    )  # one store
    assert "sweep: 2/2 done, 0 running, 0 queued, 0 failed" in run.stdout
    return dest


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
        "lmtune.pipeline.params",
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
    (smoke,) = [part for part in table.split("\n## ") if part.startswith("tiny_random on ")]
    cells = [
        [c.strip() for c in line.strip("|").split("|")] for line in smoke.splitlines() if line.startswith("|")
    ]
    assert len(cells) >= 2 + 3  # header, rule, the first run and both queued ones
    wall = cells[0].index("wall s")  # every stage's wall time, summed per run
    assert all(float(row[wall]) > 0 for row in cells[2:])
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
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with mlflow_serving("ui", store) as url:
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


def test_dvc_exp_run_without_the_profile_of_the_last_run_is_refused_with_the_command(repo):
    """After a smoke run, `dvc exp run -S lora.r=5` would compose the full default (DVC knows only
    the -S values): the first stage stops before any work and names the command that keeps smoke."""
    dest, _ = repo
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", cwd=dest)
    refused = sh("dvc", "exp", "run", "-S", "lora.r=5", cwd=dest, check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "without experiment=smoke" in said, said[-2000:]
    assert "dvc exp run -S experiment=smoke -S lora.r=5" in said and "Traceback" not in said


def test_a_smoke_run_leaves_the_workspace_results_alone(repo):
    """`make run ARGS=experiment=smoke` where the workspace holds the default: a DVC experiment in a
    temporary copy; params.yaml, dvc.lock and metrics/ here do not change, MLflow has its run."""
    dest, _ = repo
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", cwd=dest)  # the workspace: the default
    before = {
        **snapshot(dest / "metrics"),
        **{p: p.read_bytes() for p in (dest / "params.yaml", dest / "dvc.lock")},
    }
    smoke = sh(
        sys.executable, "-m", "lmtune.pipeline.repro", "experiment=smoke", "lora.r=7", cwd=dest
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
