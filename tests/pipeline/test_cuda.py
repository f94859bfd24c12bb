"""The smoke profile's stages on a CUDA card (pytest -m gpu), with no change of config: the device is
picked per process. Skipped where torch sees no GPU, or where DVC and MLflow are not installed (on such a CUDA
machine tests/unit/test_gpu_training.py runs the stages in-process instead)."""

import importlib.util
import json
import sys

import pytest
import torch
from repo_copy import copy_repo, sh

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ("dvc", "mlflow")), reason="needs DVC and MLflow"
    ),
]


def test_every_stage_of_the_smoke_profile_runs_on_the_card(tmp_path):
    dest = copy_repo(tmp_path)
    sh(sys.executable, "-m", "lmtune.pipeline.params", "--force", "experiment=smoke", cwd=dest)
    sh("dvc", "repro", cwd=dest)
    train = json.loads((dest / "metrics/train.json").read_text())
    scores = json.loads((dest / "metrics/eval.json").read_text())
    assert scores["settings"]["device"].startswith("cuda")
    assert 0 < train["peak_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    assert scores["models"]["merged"]["perplexity"]["value"] < scores["models"]["base"]["perplexity"]["value"]
    assert json.loads((dest / "metrics/merge.json").read_text())["device"] == "cuda"
    assert all(s.get("gpu_gib_left_after_release", 1) < 0.05 for s in scores["speed"].values())
