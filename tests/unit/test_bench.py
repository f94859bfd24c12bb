"""bench/gpu_check.py runs end to end (here on CPU, on a tiny Llama) and reports every side."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_reports_steady_rates_of_every_side_at_each_length(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--tiny", "--steps", "4", "--warmup", "2", "--lengths", "64", "96",
         "--profile", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["matmul_tflops"] > 0 and report["parameters"] > 0
    sides = {length: [row["side"] for row in rows] for length, rows in report["lengths"].items()}
    assert sides == {"64": ["usual recipe", "lmtune, no recompute", "lmtune's pick"],
                     "96": ["usual recipe", "lmtune's pick"]}  # fmt: skip
    for rows in report["lengths"].values():
        # every side trained on the same passages, step by step
        tokens = [[step["tokens"] for step in row["step_times"]] for row in rows]
        assert all(t == tokens[0] for t in tokens) and len(tokens[0]) == 4
        assert all(row["steady"] > 0 and row["warmup"] > 0 for row in rows)
        assert rows[-1]["recompute"] == "none"  # auto on a CPU: no allocator to measure, no recompute
    assert done.stdout.count("| usual recipe | ") == 2 and "lmtune's pick: " in done.stdout
    assert "top kernels over 3 steady steps of lmtune's pick" in done.stdout and "aten::mm" in done.stdout
