"""Every failure early, clear and harmless: bad values refused at composition, naming the key;
a params.yaml that cannot be trusted refused before any stage; output folders with the user's mode."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zc.lockfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lmtune import LmtuneError
from lmtune.artifacts import atomic_dir
from lmtune.cli.params import compose_conf, main
from lmtune.config import CHOICES, POSITIVE, RANGES, Config, ConfigError
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
        Path("params.yaml").read_text().replace("\ntrain:\n", "\ntrain:\n  epochs: 3\n")
    )
    assert main(["--keep"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_params_are_not_rewritten_while_a_pipeline_runs(tmp_path, monkeypatch, capsys):
    """dvc.lock would record params its running stages did not use: the lineage would lie."""
    in_repo_copy(tmp_path, monkeypatch)
    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    before = Path("params.yaml").read_text()
    lock = zc.lockfile.LockFile(str(tmp_path / ".dvc/tmp/lock"))  # what dvc repro holds
    try:
        assert main(["experiment=smoke", "lora.r=4"]) == 2
    finally:
        lock.close()
    assert "a pipeline is running" in capsys.readouterr().err and Path("params.yaml").read_text() == before
    assert main(["experiment=smoke", "lora.r=4"]) == 0  # once it is done


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
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def make(*args) -> str:
    return subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_help_expands_its_variables_and_the_ui_runs_alone():
    shown = make("help")
    assert "http://127.0.0.1:5000" in shown and "$(" not in shown
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in make("-n", "ui")


def test_the_sweep_summary_command_is_one_the_installed_dvc_accepts():
    recipe = make("-n", "sweep", "PY=true")
    (show,) = [line for line in recipe.splitlines() if "dvc exp show" in line]
    args = re.sub(r"\|.*", "", show).split()[3:]
    dvc = Path(sys.executable).parent / "dvc"
    result = subprocess.run([dvc, "exp", "show", *args, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
