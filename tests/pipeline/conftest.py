"""The smoke pipeline reproduced once per test process and copied for each module that needs it:
every module starts from the same committed state without paying for its own `dvc repro`."""

import shutil
import sys

import pytest
from repo_copy import copy_repo, git, sh


@pytest.fixture(scope="session")
def smoke_template(tmp_path_factory):
    """A fresh copy of the repository (tracked and new files) with the smoke profile composed and
    reproduced through DVC, and that state committed; with the output of that `dvc repro`."""
    dest = copy_repo(tmp_path_factory.mktemp("smoke"))
    sh(sys.executable, "-m", "lmtune.cli.params", "--force", "experiment=smoke", cwd=dest)
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
