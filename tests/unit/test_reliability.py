"""Bad input fails early and clearly; tracking trouble never costs the user their outputs."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmtune.base.build import build_base
from lmtune.checkpoint import ModelError
from lmtune.config import Config
from lmtune.model.load import load_for_training
from lmtune.model.lora import add_lora
from lmtune.pipeline.params import compose_conf, write_params
from lmtune.pipeline.runner import run_stage
from lmtune.track import runs as tracking
from lmtune.track import store
from lmtune.track.run_params import params_hash
from lmtune.train import TrainingError
from lmtune.train.loop import train

ROOT = Path(__file__).resolve().parents[2]


def cfg_with(**sections):
    base = OmegaConf.merge(
        OmegaConf.structured(Config), compose_conf(["experiment=smoke"], conf_dir=ROOT / "conf")
    )
    return OmegaConf.merge(base, sections)


def stage(name):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_model_path_not_found(tmp_path):
    cfg = cfg_with(model={"source": "local", "path": str(tmp_path / "nope")})
    with pytest.raises(ModelError, match=r"model\.path: local directory .*nope not found"):
        build_base(cfg, tmp_path / "out")


def test_hub_model_while_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_conf(["model=llama2_7b"], conf_dir=ROOT / "conf")
    with pytest.raises(ModelError, match=r"meta-llama/Llama-2-7b-hf.*HF_HUB_OFFLINE=1.*HF_TOKEN"):
        build_base(cfg, tmp_path / "out")


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path, tiny_base):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in tiny_base.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    torch.save({}, folder / "pytorch_model.bin")
    cfg = cfg_with(model={"source": "local", "path": str(folder)})
    with pytest.raises(ModelError, match=r"no \.safetensors weights.*model\.allow_pickle=true"):
        build_base(cfg, tmp_path / "out")


def test_unwritable_output_folder_fails_before_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(compose_conf(["experiment=smoke"], conf_dir=ROOT / "conf"), tmp_path / "params.yaml")
    ran = []
    code = run_stage(lambda cfg: ran.append(cfg) or {}, ["paths.adapter=/proc/lmtune/adapter"])
    assert code == 2 and not ran
    assert "paths.adapter=/proc/lmtune/adapter" in capsys.readouterr().err


def test_conversations_longer_than_the_context_are_refused_text_is_windowed(tmp_path, tiny_base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = shutil.copytree(tiny_base, tmp_path / "base")  # given a chat template below
    paths = {"base": str(base), "processed": "processed", "metrics": "metrics"}
    chat = OmegaConf.merge(
        cfg_with(paths=paths), {"data": compose_conf(["data=chatterbot_qa"], conf_dir=ROOT / "conf").data}
    )
    chat.data.max_length = 4
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = cfg_with().model.chat_template
    tokenizer.save_pretrained(base)
    with pytest.raises(Exception, match=r"every row is longer than data\.max_length=4 tokens"):
        stage("prepare").run(chat)
    assert not Path("processed").exists()  # nothing half-written
    text = cfg_with(data={"max_length": 16, "max_samples": 50}, paths=paths)
    metrics = stage("prepare").run(text)  # long passages become windows: nothing refused, nothing cut
    assert metrics["train"]["sequences"] > metrics["train"]["rows"] and metrics["train"]["tokens_max"] <= 16


def test_corrupted_checkpoint_is_named_on_resume(tmp_path, tiny_base, tiny_seqs):
    seqs, tokenizer = tiny_seqs
    cfg = cfg_with(quant={"bits": 16}, train={"max_steps": 4, "checkpoint_every": 2})

    def model():
        return add_lora(load_for_training(tiny_base, cfg.quant, False), cfg.lora, cfg.seed)

    def die(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model(), seqs, seqs[:4], cfg, tmp_path, tokenizer.pad_token_id, on_step=die)
    (tmp_path / "step-000002" / "lora.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(TrainingError, match=r"step-000002 is corrupted.*rm -r"):
        train(model(), seqs, seqs[:4], cfg, tmp_path, tokenizer.pad_token_id)


def test_unreachable_tracking_server_fails_at_start(monkeypatch):
    cfg = cfg_with(tracking={"uri": "http://127.0.0.1:9"})
    with pytest.raises(
        store.TrackingError,
        match=r"tracking\.uri=http://127\.0\.0\.1:9 is not reachable.*tracking\.uri=null",
    ):
        store.check_reachable(cfg)
    # from the environment: the advice is to change the environment, not the config
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(store.TrackingError, match=r"MLFLOW_TRACKING_URI=.*unset MLFLOW_TRACKING_URI"):
        store.check_reachable(cfg_with())


def test_a_damaged_store_fails_before_any_work_and_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(compose_conf(["experiment=smoke"], conf_dir=ROOT / "conf"), tmp_path / "params.yaml")
    (tmp_path / "mlflow.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)
    ran = []
    code = run_stage(lambda cfg: ran.append(cfg) or {}, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and not ran and "Traceback" not in err
    assert "cannot be used as an MLflow store" in err and "mv mlflow.db mlflow.db.broken" in err


def test_tracking_failures_mid_run_only_warn(monkeypatch, capsys, tmp_path):
    """Once a stage runs, the store going away costs one warning: the stage's work and files stand."""
    monkeypatch.chdir(tmp_path)
    cfg = cfg_with(tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("server went away")

    with tracking.stage_run(cfg, "finetune") as run:
        monkeypatch.setattr(run.client, "log_batch", broken)
        monkeypatch.setattr(run.client, "log_artifact", broken)
        monkeypatch.setattr(run.client, "set_terminated", broken)
        log = tracking.step_logger()
        for step in range(1, 4):
            log(step, {"train_loss": 1.0})
    assert len(calls) == 1  # gave up after the first failure: no stalls on every step
    err = capsys.readouterr().err
    assert err.count("warning: MLflow") == 1 and "outputs and metrics/*.json are complete" in err


def test_a_stage_that_fails_marks_its_run_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cfg_with(tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    with pytest.raises(TrainingError), tracking.stage_run(cfg, "finetune") as run:
        run.log_metrics({"train_loss": 2.5}, step=1)
        raise TrainingError("loss is nan")
    (run,) = store.client(cfg.tracking.uri).search_runs(
        [store.client(cfg.tracking.uri).get_experiment_by_name("lmtune").experiment_id]
    )
    assert run.info.status == "FAILED" and run.data.tags[tracking.PARAMS_HASH_TAG] == params_hash(cfg)


def test_input_refused_before_any_work_leaves_no_failed_run_behind(tmp_path, monkeypatch):
    """Trying data files one after another: each refused one would leave a FAILED run of its own.
    A run the refusing stage opened and that holds no number is removed; an earlier stage's run
    stays, marked FAILED."""
    from lmtune.data import DataError

    monkeypatch.chdir(tmp_path)
    cfg = cfg_with(tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    mlflow_client = store.client(cfg.tracking.uri)
    with pytest.raises(DataError), tracking.stage_run(cfg, "prepare"):
        raise DataError("data/own/a.jsonl:1: no 'text' field")
    experiment = mlflow_client.get_experiment_by_name("lmtune").experiment_id
    assert mlflow_client.search_runs([experiment]) == []
    with tracking.stage_run(cfg, "base"):
        pass
    with pytest.raises(DataError), tracking.stage_run(cfg, "prepare"):
        raise DataError("data/own/a.jsonl:1: no 'text' field")
    (run,) = mlflow_client.search_runs([experiment])
    assert run.info.status == "FAILED" and "wall_seconds.base" in run.data.metrics


def test_remote_code_is_off_by_default_everywhere():
    for option in (ROOT / "conf/model").glob("*.yaml"):
        cfg = compose_conf([f"model={option.stem}"], conf_dir=ROOT / "conf")
        assert cfg.model.trust_remote_code is False and cfg.model.allow_pickle is False


def _queue_status(*rows: tuple[str, str]) -> str:
    """`dvc queue status` as DVC prints it: a table of tasks, then the workers."""
    lines = ["Task     Name         Created    Status"]
    lines += [f"{i:07x}  {name}  10:23 AM   {state}" for i, (name, state) in enumerate(rows)]
    return "\n".join(lines) + "\n\nWorker status: 0 active, 0 idle\n"


def test_the_sweep_runner_restarts_a_stopped_worker_and_names_failures(monkeypatch, capsys):
    """DVC's queue worker can exit with experiments still queued: the runner starts one again
    (and only then says so); a failed point is named with its log command; an earlier sweep's
    finished tasks are not counted."""
    from lmtune.tools import sweep

    states = iter(
        [
            _queue_status(("old-one", "Failed"), ("exp-a", "Running"), ("exp-b", "Queued")),
            _queue_status(("old-one", "Failed"), ("exp-a", "Success"), ("exp-b", "Queued")),  # worker gone
            _queue_status(("old-one", "Failed"), ("exp-a", "Success"), ("exp-b", "Running")),
            _queue_status(("old-one", "Failed"), ("exp-a", "Success"), ("exp-b", "Failed")),
        ]
    )
    starts = []

    def fake_dvc(*args):
        if args[:2] == ("queue", "status"):
            return next(states)
        starts.append(args)
        return "Started '1' new experiments task queue worker.\n" if len(starts) == 1 else "Started '0' ..."

    monkeypatch.setattr(sweep, "dvc", fake_dvc)
    with pytest.raises(
        sweep.SweepError, match=r"1 of 2 experiments failed: exp-b \(`dvc queue logs exp-b`\)"
    ):
        sweep.run_queue(jobs=1, poll=0)
    assert starts == [("queue", "start", "-j", "1")]  # only when nothing ran and exp-b waited
    out = capsys.readouterr().out
    assert "sweep: 0/2 done, 1 running, 1 queued, 0 failed" in out
    assert "sweep: 1/2 done, 0 running, 0 queued, 1 failed" in out and "Started '1'" in out


def test_the_sweep_runner_gives_up_at_its_deadline_naming_what_waits(monkeypatch):
    from lmtune.tools import sweep

    monkeypatch.setattr(sweep, "dvc", lambda *args: _queue_status(("exp-a", "Running")))
    with pytest.raises(sweep.SweepError, match=r"within 0 s; still waiting: exp-a \(Running\)"):
        sweep.run_queue(jobs=1, timeout=0, poll=0)


def test_dirty_names_changed_code_or_config_not_what_the_pipeline_wrote(tmp_path):
    """A stage that runs after others wrote dvc.lock and metrics/ runs the committed code: clean.
    An edit to code or config is dirty, and provenance names the file."""
    import subprocess

    from lmtune.provenance import git_state

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    for name in ("dvc.lock", "params.yaml", "metrics/eval.json", "src/lmtune/config.py", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("committed\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    (tmp_path / "dvc.lock").write_text("a stage ran\n")
    (tmp_path / "metrics/eval.json").write_text("{}\n")
    (tmp_path / "metrics/made_by").mkdir()
    (tmp_path / "metrics/made_by/eval.json").write_text("{}\n")  # untracked: not counted either
    (tmp_path / "README.md").write_text("docs are not code\n")
    state = git_state(tmp_path / "src")  # asked from a subfolder: the whole tree counts
    assert state["dirty"] is False and state["changed"] == [] and len(state["commit"]) == 40
    (tmp_path / "params.yaml").write_text("edited\n")
    (tmp_path / "src/lmtune/config.py").write_text("edited\n")
    assert git_state(tmp_path) | {"commit": None} == {
        "commit": None,
        "dirty": True,
        "changed": ["params.yaml", "src/lmtune/config.py"],
    }
