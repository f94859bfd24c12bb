"""The smoke profile's stages on a CUDA card (pytest -m gpu), with no change of config: the device is
picked per process. Skipped where torch sees no GPU; it needs bitsandbytes with CUDA kernels.
Not yet run on a card: no GPU machine was lent while it was written."""

import json
import sys

import pytest
import torch
from repo_copy import copy_repo, sh

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_every_stage_of_the_smoke_profile_runs_on_the_card(tmp_path):
    dest = copy_repo(tmp_path)
    sh(sys.executable, "-m", "lmtune.params", "--force", "experiment=smoke", cwd=dest)
    sh("dvc", "repro", cwd=dest)
    train = json.loads((dest / "metrics/train.json").read_text())
    scores = json.loads((dest / "metrics/eval.json").read_text())
    assert scores["settings"]["device"].startswith("cuda")
    assert 0 < train["peak_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    assert scores["models"]["merged"]["perplexity"]["value"] < scores["models"]["base"]["perplexity"]["value"]
