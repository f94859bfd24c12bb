"""Every failure early, clear and harmless: bad values refused at composition, naming the key;
a params.yaml that cannot be trusted refused before any stage; output folders with the user's mode."""

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lmtune import LmtuneError
from lmtune.artifacts import atomic_dir
from lmtune.config import CHOICES, POSITIVE, RANGES, Config, ConfigError
from lmtune.pipeline.params import compose_conf, main
from lmtune.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
NUMERIC = sorted(set(POSITIVE) | set(RANGES))
ANY_NUMBER = st.one_of(
    st.integers(-3, 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 0.0, -0.0, 1e-12, 1.0, 1e30, float("nan")]),
)
ANY_CHOICE = st.one_of(
    st.sampled_from([str(v) for values in CHOICES.values() for v in values] + ["x", "null"])
)


def compose_or_refuse(key: str, value) -> object:
    """The composed config, or None when refused; a refusal must name the key."""
    try:
        return compose_conf(["experiment=smoke", f"{key}={value}"], conf_dir=CONF)
    except ConfigError as err:
        assert key in str(err), f"{key}={value} refused without naming the key: {err}"
        return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(NUMERIC), value=ANY_NUMBER)
def test_every_number_is_accepted_or_refused_naming_the_key(key, value):
    cfg = compose_or_refuse(key, value)
    if cfg is not None:  # accepted: it is a usable value of that key
        bounds = RANGES.get(key, (1, float("inf"), True, False, False))
        assert value == value and value >= bounds[0], f"{key}={value} accepted"  # NaN != NaN


@settings(max_examples=30, deadline=None)
@given(key=st.sampled_from(sorted(CHOICES)), value=ANY_CHOICE)
def test_every_choice_is_accepted_or_refused_naming_the_key(key, value):
    cfg = compose_or_refuse(key, value)
    if cfg is not None:
        assert OmegaConf.select(cfg, key) in CHOICES[key]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(
        ["train.lr", "train.weight_decay", "train.max_grad_norm", "train.warmup_steps", "lora.r"]
    ),
    value=ANY_NUMBER,
)
def test_training_values_are_refused_at_composition_or_train(
    key, value, tiny_base, tiny_seqs, tmp_path_factory
):
    """What composition accepts, the stage that reads it runs with: it trains, or stops with a clear
    error of its own (say, a loss that overflows), never a library's traceback."""
    from lmtune.model.load import load_for_training
    from lmtune.model.lora import add_lora

    composed = compose_or_refuse(key, value)
    if composed is None:
        return
    cfg = OmegaConf.merge(
        OmegaConf.structured(Config), composed, {"quant": {"bits": 16}, "train": {"max_steps": 2}}
    )
    seqs, tokenizer = tiny_seqs
    try:
        model = add_lora(load_for_training(tiny_base, cfg.quant, False), cfg.lora, cfg.seed)
        train(model, seqs, seqs[:4], cfg, tmp_path_factory.mktemp("ckpt"), tokenizer.pad_token_id)
    except LmtuneError:
        pass  # a clear message, e.g. "loss is inf at step 1"


def in_repo_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").symlink_to(CONF)
    assert main(["experiment=smoke"]) == 0


def test_garbage_in_params_yaml_is_refused_by_make_run(tmp_path, monkeypatch, capsys):
    in_repo_copy(tmp_path, monkeypatch)
    Path("params.yaml").write_text("a: [b\n  ::: x")
    assert main(["--keep"]) == 2  # what `make run` calls
    err = capsys.readouterr().err
    assert "params.yaml is not valid YAML" in err and "make params FORCE=1" in err and "Traceback" not in err


def test_an_unknown_key_typed_into_params_yaml_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    in_repo_copy(tmp_path, monkeypatch)
    Path("params.yaml").write_text(
        Path("params.yaml").read_text().replace("\ntrain:\n", "\ntrain:\n  num_epochs: 3\n")
    )
    assert main(["--keep"]) == 2
    assert "train.num_epochs" in capsys.readouterr().err


def test_params_are_not_rewritten_while_a_pipeline_runs(tmp_path, monkeypatch, capsys):
    """dvc.lock would record params its running stages did not use: the lineage would lie. Here the
    holders are stood in for (another lmtune command's flock, a stage DVC runs); a real `dvc repro`
    in another process is tests/pipeline/test_pipeline.py's."""
    import fcntl
    import json

    from lmtune.pipeline.lock import LOCK_FILE

    in_repo_copy(tmp_path, monkeypatch)
    (tmp_path / ".dvc/tmp").mkdir(parents=True, exist_ok=True)
    before = Path("params.yaml").read_text()
    with open(LOCK_FILE, "a+") as held:  # another `make run` of this repository
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["experiment=smoke", "lora.r=4"]) == 2
    assert "a pipeline is running" in capsys.readouterr().err and Path("params.yaml").read_text() == before
    rwlock = {"write": {"models/base": {"pid": os.getpid(), "cmd": "dvc repro"}}, "read": {}}
    Path(".dvc/tmp/rwlock").write_text(json.dumps(rwlock))  # DVC running a stage, as it records it
    assert main(["experiment=smoke", "lora.r=4"]) == 2
    assert f"PID {os.getpid()}: dvc repro" in capsys.readouterr().err
    assert Path("params.yaml").read_text() == before
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    rwlock["write"]["models/base"]["pid"] = int(dead.stdout)  # a DVC that died: its entry is stale
    Path(".dvc/tmp/rwlock").write_text(json.dumps(rwlock))
    assert main(["experiment=smoke", "lora.r=4"]) == 0  # nothing runs any more


def test_one_passage_per_line_text_says_how_text_files_are_split(tmp_path):
    from lmtune.data import DataError
    from lmtune.data.sequences import split
    from lmtune.data.sources import load_rows

    (tmp_path / "lines.txt").write_text("".join(f"line {i}\n" for i in range(50)))
    data = compose_conf(
        ["data=files", f"data.files=[{tmp_path / 'lines.txt'}]", f"data.dir={tmp_path}"], conf_dir=CONF
    )
    rows, _ = load_rows(data.data)
    with pytest.raises(DataError, match="blank line"):
        split(rows, 1, 0.05, 0.05)


def test_output_folders_get_the_users_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as out:
            (out / "f").write_text("x")
            (out / "weights").write_text("x")
            (out / "weights").chmod(0o600)  # as safetensors writes its files
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {
        "f": 0o644,
        "weights": 0o644,
    }


def make(*args) -> str:
    return subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_help_expands_its_variables_and_the_ui_runs_alone():
    shown = make("help")
    assert "http://127.0.0.1:5000" in shown and "$(" not in shown
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in make("-n", "ui")


def test_the_sweep_summary_command_is_one_the_installed_dvc_accepts():
    recipe = make("-n", "sweep", "PY=true")
    (show,) = [line for line in recipe.splitlines() if "dvc exp show" in line]
    args = shlex.split(show.split("dvc exp show", 1)[1].split(";")[0])
    assert "--keep" in args and "--drop" in args
    dvc = Path(sys.executable).parent / "dvc"
    result = subprocess.run([dvc, "exp", "show", *args, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "raised, code, says",
    [
        (KeyboardInterrupt(), 130, "stopped. Nothing half-written was kept"),
        (OSError(28, "No space left on device", "models/merged/model.safetensors"), 2, "the disk is full"),
        (
            RuntimeError("Error while serializing: IoError(Os { code: 28, ... }) os error 28"),
            2,
            "the disk is full",
        ),
    ],
)
def test_ctrl_c_and_a_full_disk_end_a_stage_with_one_line(tmp_path, monkeypatch, capsys, raised, code, says):
    from lmtune.pipeline import runner

    in_repo_copy(tmp_path, monkeypatch)
    monkeypatch.setattr(runner.tracking, "stage_run", lambda cfg, name: contextlib.nullcontext())

    def stage_x(cfg):
        raise raised

    assert runner.run_stage(stage_x, argv=[]) == code
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_unexpected_error_still_shows_its_traceback(tmp_path, monkeypatch):
    from lmtune.pipeline import runner

    in_repo_copy(tmp_path, monkeypatch)
    monkeypatch.setattr(runner.tracking, "stage_run", lambda cfg, name: contextlib.nullcontext())

    def stage_x(cfg):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        runner.run_stage(stage_x, argv=[])


def test_a_model_that_needs_its_own_code_says_which_switch_allows_it(tmp_path, tiny_base, smoke_cfg):
    """transformers' ValueError becomes one line naming model.trust_remote_code."""
    import shutil

    from lmtune.base.build import build_base
    from lmtune.checkpoint import ModelError

    model = tmp_path / "custom"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        shutil.copy(tiny_base / name, model / name)
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (model / "config.json").write_text(json.dumps({"model_type": "custom_x", "auto_map": auto_map}))
    cfg = OmegaConf.merge(smoke_cfg, {"model": {"source": "local", "path": str(model), "tiny": None}})
    with pytest.raises(ModelError, match=r"set model.trust_remote_code=true"):
        build_base(cfg, tmp_path / "base")


def test_make_chat_without_a_model_says_to_run_the_pipeline(tmp_path, smoke_cfg):
    """Not transformers' hub lookup for a folder that is not there (after make clean)."""
    from lmtune import LmtuneError
    from lmtune.tools.chat import Chat

    with pytest.raises(LmtuneError, match=r"holds no model: run the pipeline first \(make run\)"):
        Chat("fine-tuned", str(tmp_path / "models/merged"), smoke_cfg)


def test_an_unwritable_output_folder_is_named_as_the_stages_output_not_its_input(
    tmp_path, monkeypatch, smoke_cfg
):
    """models/ read-only (a mount, say) before finetune: the message names paths.adapter, which the
    stage writes, not paths.base, which it only reads. (A real write is tried: as root, permission
    bits would not stop one, so the refusal is stood in for.)"""
    from lmtune.pipeline import runner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    real = runner.tempfile.TemporaryFile

    def read_only_models(dir):
        if Path(dir).resolve() == (tmp_path / "models").resolve():
            raise PermissionError(13, "Read-only file system")
        return real(dir=dir)

    monkeypatch.setattr(runner.tempfile, "TemporaryFile", read_only_models)
    inputs = runner.stage_inputs("finetune", ROOT / "dvc.yaml")
    assert inputs == {"base", "processed"}
    with pytest.raises(ConfigError, match=r"^paths\.adapter=models/adapter: .*models is not writable"):
        runner.check_writable(smoke_cfg, inputs)


@pytest.mark.parametrize("changed, fails", [("lora.r", True), ("sample.max_new_tokens", False)])
def test_a_stage_whose_params_change_on_disk_while_it_runs_fails_naming_them(
    tmp_path, monkeypatch, capsys, changed, fails
):
    """`git stash` under a running finetune: DVC would record the stashed params beside an adapter
    made with others. The stage fails instead (DVC records nothing); a key it does not read may
    change (the next run's edits)."""
    import shutil

    from lmtune.pipeline import runner

    in_repo_copy(tmp_path, monkeypatch)
    shutil.copy(CONF.parent / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.setattr(runner.tracking, "stage_run", lambda cfg, name: contextlib.nullcontext())
    monkeypatch.setattr(runner, "stage_name", lambda run: "finetune")

    def finetune(cfg):
        text = Path("params.yaml").read_text()
        key, value = changed.split(".")
        Path("params.yaml").write_text(
            re.sub(rf"(\n{key}:\n(?:  .*\n)*?  {value}:) .*", r"\1 2", text, count=1)
        )
        return {}

    before = Path("params.yaml").read_text()
    assert runner.run_stage(finetune, argv=[]) == (2 if fails else 0)
    assert Path("params.yaml").read_text() != before  # the edit happened in both cases
    err = capsys.readouterr().err
    if fails:
        assert "params.yaml changed while finetune ran (lora.r: 16 -> 2;" in err
        assert "DVC does not record it" in err


def test_the_recovery_advice_after_a_failed_dvc_repro_keeps_uncommitted_results(tmp_path):
    """docs/troubleshooting.md's command puts back what DVC deleted, and nothing else."""
    advice = (CONF.parent / "docs/troubleshooting.md").read_text()
    (command,) = re.findall(r"After a plain `dvc repro`, `([^`]+)`", advice)
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    (tmp_path / "metrics").mkdir()
    for name in ("eval.json", "quantize.json"):
        (tmp_path / "metrics" / name).write_text("committed")
    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "results")
    (tmp_path / "metrics/quantize.json").write_text("this run's, not committed yet")
    (tmp_path / "metrics/eval.json").unlink()  # DVC removed it before eval failed
    subprocess.run(command.replace("\\|", "|"), shell=True, cwd=tmp_path, check=True)
    assert (tmp_path / "metrics/eval.json").read_text() == "committed"
    assert (tmp_path / "metrics/quantize.json").read_text() == "this run's, not committed yet"


def test_a_test_split_too_small_for_eval_is_refused_at_prepare(tmp_path, tiny_base, monkeypatch, capsys):
    """An own file of 80 rows leaves 4 test examples: refused when the splits are made, not after
    finetune, merge and quantize ran."""
    monkeypatch.syspath_prepend(str(CONF.parent / "stages"))
    import prepare

    own = tmp_path / "data/own"
    own.mkdir(parents=True)
    (own / "qa.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n" for i in range(80)
        )
    )
    monkeypatch.chdir(tmp_path)
    cfg = compose_conf(
        [
            "experiment=smoke",
            "data=files",
            "data.format=chat",
            f"data.dir={own}",
            f"data.files=[{own / 'qa.jsonl'}]",
            f"paths.base={tiny_base}",
        ],
        conf_dir=CONF,
    )
    with pytest.raises(
        LmtuneError, match=r"the test split holds 4 examples \(4 of 80 rows at data.test_fraction=0.05\)"
    ):
        prepare.run(cfg)
    assert not (tmp_path / cfg.paths.processed).exists()  # nothing half-made was kept


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["lora.r=100000"], r"lora.r=100000: wider than every layer of smollm2_135m \(hidden size 576\)"),
        (["experiment=smoke", "lora.r=200"], r"wider than every layer of tiny_random \(hidden size 128\)"),
        (
            ["quant=qat_int4", "quantize=int8_dynamic"],
            r"quantize=int8_dynamic and quant=qat_int4 both set quantize.method .* Drop one",
        ),
    ],
)
def test_what_finetune_or_a_silent_override_would_meet_is_refused_at_make_params(overrides, says):
    with pytest.raises(ConfigError, match=says):
        compose_conf(overrides, conf_dir=CONF)


def test_make_run_refuses_a_model_it_cannot_get_before_dvc_deletes_models_base(tmp_path, monkeypatch, capsys):
    from lmtune.pipeline import repro as pipeline

    in_repo_copy(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models/base").mkdir(parents=True)
    (tmp_path / "models/base/config.json").write_text("{}")
    monkeypatch.setattr(pipeline.subprocess, "call", lambda *a, **k: pytest.fail("dvc ran"))
    assert pipeline.main(["model=llama3_8b"]) == 2
    err = capsys.readouterr().err
    assert "is a hub id but HF_HUB_OFFLINE=1" in err and "nothing ran; models/base is as it was" in err
    assert (tmp_path / "models/base/config.json").read_text() == "{}"
    # the same model already built (dvc.lock records it): base will not rerun, so offline is fine
    cfg = compose_conf(["model=llama3_8b"], conf_dir=CONF)
    recorded = {"seed": cfg.seed, "model": OmegaConf.to_container(cfg.model, resolve=True)}
    (tmp_path / "dvc.lock").write_text(
        json.dumps({"stages": {"base": {"params": {"params.yaml": recorded}}}})  # JSON is YAML
    )
    assert not pipeline.base_will_run(cfg)
    assert pipeline.base_will_run(compose_conf(["model=llama2_7b"], conf_dir=CONF))


def test_a_venv_made_in_another_folder_is_found_and_make_setup_reinstalls(tmp_path):
    """A copied project's .venv runs the original folder's code (its #! lines and editable install
    point there): install.sh --moved says so, and the Makefile then reruns setup."""
    import shutil

    for name in ("original", "copy"):
        (tmp_path / name / ".venv/bin").mkdir(parents=True)
        for file in ("install.sh", "Makefile", "pyproject.toml"):
            shutil.copy(CONF.parent / file, tmp_path / name / file)
        (tmp_path / name / ".venv/bin/pip").write_text(f"#!{tmp_path}/original/.venv/bin/python\n")
        (tmp_path / name / ".venv/.installed").touch()  # set up, and newer than what it depends on

    def run(where: str, *command: str) -> str:
        return subprocess.run(
            command, cwd=tmp_path / where, capture_output=True, text=True, check=True
        ).stdout

    assert run("original", "bash", "install.sh", "--moved").strip() == ""
    assert run("copy", "bash", "install.sh", "--moved").strip() == "yes"
    plan = {where: run(where, "make", "-n", "setup") for where in ("original", "copy")}
    assert "install.sh" not in plan["original"] and "./install.sh" in plan["copy"]


def test_make_chat_after_a_scratch_run_says_where_its_models_are(tmp_path, monkeypatch):
    """`make run ARGS=experiment=smoke` in a workspace of another profile runs as a DVC experiment
    apart: its models are not in models/, and saying `make run` would send the user in a circle."""
    from lmtune.pipeline.params import no_model, record_profile

    in_repo_copy(tmp_path, monkeypatch)
    assert main(["--force"]) == 0  # this workspace: the default profile
    plain = no_model("models/merged")
    assert plain == "models/merged holds no model: run the pipeline first (make run), or dvc pull it"
    record_profile(["experiment=smoke"])  # what `make run ARGS=experiment=smoke` records
    hinted = no_model("models/merged")
    assert hinted.startswith(plain) and "`dvc exp apply <name>` brings its models here" in hinted


def test_make_run_after_dvc_exp_apply_recovers_the_overrides_of_dvcs_params_file(
    tmp_path, monkeypatch, capsys
):
    """`dvc exp apply` brings the params.yaml DVC composed, without lmtune's header: `make run`
    finds the overrides that make its values and records them, instead of keeping an unknown file."""
    from lmtune.pipeline.params import read_header, update

    in_repo_copy(tmp_path, monkeypatch)
    applied = ["experiment=smoke", "data=chatterbot_qa", "lora.r=4"]
    Path("params.yaml").write_text(OmegaConf.to_yaml(compose_conf(applied, conf_dir=CONF), resolve=True))
    cfg = update([], keep=True)
    out = capsys.readouterr().out
    assert "is conf/ with: experiment=smoke data=chatterbot_qa lora.r=4" in out and "keeping" not in out
    assert read_header(Path("params.yaml")) == (applied, True) and cfg.lora.r == 4
    Path("params.yaml").write_text(Path("params.yaml").read_text().partition("\n")[2] + "stray: 1\n")
    with pytest.raises(ConfigError, match="stray"):  # a key conf/ lacks: not recoverable, and refused
        update([], keep=True)
