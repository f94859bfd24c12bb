"""bench/gpu_check.py runs end to end (here on CPU, on a tiny Llama) and reports every side."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_side_and_picks_lmtunes_setting(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--tiny", "--steps", "3", "--max-length", "64", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    names = [side["name"] for side in report["sides"]]
    assert names == ["baseline", "lmtune, checkpointing", "lmtune, no checkpointing"]
    for side in report["sides"]:
        assert side["steps"] == 3 and side["useful_tokens"] > 0 and side["useful_tokens_per_second"] > 0
    # every side trained on the same passages: 3 steps x 4 passages of 32..64 tokens
    assert len({side["useful_tokens"] for side in report["sides"]}) == 1
    assert "(lmtune's pick)" in done.stdout and "| baseline | " in done.stdout
