"""bench/gpu_check.py runs end to end (here on CPU, on a tiny Llama) and reports every side."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_reports_steady_rates_of_every_side_at_each_length(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/gpu_check.py",
            "--tiny",
            "--steps",
            "4",
            "--warmup",
            "2",
            "--lengths",
            "64",
            "96",
            "--profile",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["matmul_tflops"] > 0 and report["parameters"] > 0
    sides = {length: [row["side"] for row in rows] for length, rows in report["lengths"].items()}
    assert sides == {
        "64": ["usual recipe", "lmtune, no recompute", "lmtune's pick"],
        "96": ["usual recipe", "lmtune's pick"],
    }
    for rows in report["lengths"].values():
        # every side trained on the same passages, step by step
        tokens = [[step["tokens"] for step in row["step_times"]] for row in rows]
        assert all(t == tokens[0] for t in tokens) and len(tokens[0]) == 4
        assert all(row["steady"] > 0 and row["warmup"] > 0 for row in rows)
        assert rows[-1]["recompute"] == "none"  # auto on a CPU: no allocator to measure, no recompute
    assert done.stdout.count("| usual recipe | ") == 2 and "lmtune's pick: " in done.stdout
    assert "top kernels over 3 steady steps of lmtune's pick" in done.stdout and "aten::mm" in done.stdout


def test_the_usual_recipe_trains_on_what_prepare_wrote_and_times_each_step(tiny_base, tiny_seqs, smoke_cfg):
    """`make bench`'s baseline on sequences as read_sequences returns them (numpy integers, which
    the stock collator's pad refused until bench/baseline.py made them ints). Its tokens are those
    of the batches trained on: counting in the collator had added the batch the loader fetches
    ahead (4 batches counted for 3 trained on)."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT / "bench"))
    from baseline import load_usual, train_usual

    from lmtune.config import Config
    from lmtune.data.sequences import Sequence

    seqs, tokenizer = tiny_seqs
    cfg = OmegaConf.merge(OmegaConf.structured(Config), smoke_cfg)
    # equal lengths, so the tokens of 3 steps are known: 3 x batch_size x 20
    as_read = [Sequence(list(np.asarray(s[:20], dtype=np.int64))) for s in seqs if len(s) >= 20]
    model = load_usual(tiny_base, torch.float32, cfg.lora)
    useful, seconds, steps = train_usual(model, tokenizer, as_read, cfg.train, 3, cfg.seed, torch.float32)
    assert [s["step"] for s in steps] == [1, 2, 3] and seconds > 0
    assert [s["tokens"] for s in steps] == [cfg.train.batch_size * 20] * 3
    assert useful == 3 * cfg.train.batch_size * 20


def both_sides(script: str, tmp_path, *args: str) -> dict[str, dict]:
    """trl's side and lmtune's of a bench script, each in its own process: side → its JSON."""
    sides = {}
    for side in ("trl", "lmtune"):
        out = tmp_path / f"{side}.json"
        done = subprocess.run(
            [sys.executable, f"bench/{script}", "--side", side, "--out", str(out), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        sides[side] = json.loads(out.read_text())
    return sides


def test_the_preference_bench_trains_trl_and_lmtune_on_the_same_pairs_and_steps(tmp_path, tiny_base):
    sides = both_sides(
        "preference.py", tmp_path, "--steps", "2", f"paths.base={tiny_base}", "data.max_length=128",
        "align.batch_size=4", "align.warmup_steps=0",
    )  # fmt: skip
    for result in sides.values():
        assert result["steps"] == 2 and result["pairs_per_step"] == 4
        assert result["useful_tokens"] > 0 and result["useful_tokens_per_second"] > 0
        assert 0 <= result["final_reward_accuracy"] <= 1 and result["peak_memory_gib"] > 0
    assert sides["lmtune"]["packed"] and sides["lmtune"]["reference_seconds"] > 0


def test_the_rl_bench_runs_trl_and_lmtune_on_the_same_task_group_and_steps(tmp_path, tiny_base):
    sides = both_sides(
        "rl.py", tmp_path, "--steps", "2", f"paths.base={tiny_base}", "rl.num_generations=2",
        "rl.batch_size=2", "rl.grad_accum=2",
    )  # fmt: skip
    for result in sides.values():
        assert result["steps"] == 2 and result["completions_per_step"] == 4
        assert len(result["rewards"]) == 2  # one rollout batch per step, each side
        assert result["completions_sampled"] == 2 * 4  # 2 prompts x 2 completions a step
        # every completion sampled is counted: 4 per step, each 1 to 24 tokens
        assert 2 * 4 <= result["completion_tokens"] <= 2 * 4 * 24
        assert result["completion_tokens_per_second"] > 0 and result["peak_memory_gib"] > 0
    assert sides["lmtune"]["generation_seconds"] > 0
