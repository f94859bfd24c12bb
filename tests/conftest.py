"""Shared fixtures: a tiny Llama and tokenizer built in-process (no hub), saved to tmp_path."""

import os

# Tests are offline whatever the user's shell says; the other environment defaults are lmtune's own
# (lmtune/__init__.py), set when it is imported, here and in every stage a test starts.
os.environ["HF_HUB_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: a thread each, for
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # it and the stages it starts (no oversubscription)

import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from repo_copy import copy_repo, git, sh  # noqa: E402

from lmtune.config import Config  # noqa: E402
from lmtune.pipeline.params import compose_conf

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;",
    "MACBETH:\nTomorrow, and tomorrow, and tomorrow,\nCreeps in this petty pace from day to day,",
    "LEAR:\nBlow, winds, and crack your cheeks! rage! blow!\nYou cataracts and hurricanoes, spout",
    "PORTIA:\nThe quality of mercy is not strain'd,\nIt droppeth as the gentle rain from heaven",
    "PUCK:\nIf we shadows have offended,\nThink but this, and all is mended,",
] * 4


@pytest.fixture(scope="session")
def smoke_cfg():
    """The smoke profile as stages see it."""
    return compose_conf(["experiment=smoke"], conf_dir=ROOT / "conf")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, smoke_cfg):
    """models/base for a tiny random Llama (hidden 128: a multiple of the 4-bit block size)."""
    from lmtune.base.build import build_base

    out = tmp_path_factory.mktemp("base")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), smoke_cfg)
    build_base(cfg, out, TEXTS)
    return out


@pytest.fixture
def tiny_seqs(tiny_base):
    from lmtune.checkpoint import load_tokenizer
    from lmtune.data.sequences import tokenize

    tokenizer = load_tokenizer(tiny_base)
    return tokenize(TEXTS, tokenizer, 64), tokenizer


# The pipeline tests' shared start: the smoke pipeline reproduced once per test process and copied
# for each module that needs it, so that every module starts from the same committed state.


@pytest.fixture(scope="session")
def smoke_template(tmp_path_factory):
    """A fresh copy of the repository (tracked and new files) with the smoke profile composed and
    reproduced through DVC, and that state committed; with the output of that `dvc repro`."""
    dest = copy_repo(tmp_path_factory.mktemp("smoke"))
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", cwd=dest)
    repro = sh("dvc", "repro", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-qm", "the smoke profile, reproduced", cwd=dest)
    return dest, repro


@pytest.fixture(scope="module")
def repo(smoke_template, tmp_path_factory):
    """This module's own copy of the reproduced smoke repository (git history, DVC cache, MLflow
    store and all): what one module's tests do to it, no other module sees."""
    template, repro = smoke_template
    dest = tmp_path_factory.mktemp("repo") / "project"
    shutil.copytree(template, dest, symlinks=True)
    return dest, repro
