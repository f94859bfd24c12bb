"""RL with verifiable rewards (GRPO family) on the quantized base → models/rl, data/rollouts.

    python stages/rl.py [key=value ...]    # runs when rl != none: make run ARGS=experiment=rl

Starts from the SFT (or preference-tuned) adapter (rl.start=tuned) or a fresh one (base); each
rollout batch samples rl.num_generations completions of rl.batch_size prompts of a reasoning-gym
task from the current policy, scores them with the rewards (rl.rewards) and trains on their
group-relative advantages. Every rollout batch is written to data/rollouts as Parquet (prompts,
completions, rewards by function, advantages, log-probabilities, the sampling seed) and logged to
MLflow as a table; `python -m lmtune.rl.replay` retrains from them alone to the same adapter bytes.
Killed midway, it resumes from its last checkpoint on the rollouts it had sampled. metrics/rl.json
holds the curve's last step and the held-out accuracy of the starting and the tuned policy.
"""

import shutil
import sys
from pathlib import Path

from lmtune.artifacts import atomic_dir, save_config, write_json, write_text
from lmtune.checkpoint import load_tokenizer, save_tokenizer
from lmtune.model.lora import save_adapter
from lmtune.pipeline.runner import run_stage, stage_params
from lmtune.rl.loop import fingerprint, held_out, start_policy, train_rl
from lmtune.rl.report import curve_frame, curve_plot, held_out_markdown, rollout_table, samples_markdown
from lmtune.rl.rewards import reward_functions
from lmtune.rl.tasks import load_task, prompt_ids
from lmtune.track import runs as tracking

STAGE = Path(__file__).stem  # its params (what its output folder records): dvc.yaml's list


def run(cfg) -> dict:
    paths, rl = cfg.paths, cfg.rl
    task, train_rows, test_rows = load_task(rl, cfg.seed)  # before any model loads
    functions = reward_functions(rl.rewards, task, rl.answer)
    tokenizer = load_tokenizer(paths.base)
    train_prompts = [prompt_ids(r["question"], rl, tokenizer) for r in train_rows]
    test_prompts = [prompt_ids(r["question"], rl, tokenizer) for r in test_rows]
    model, packed, as_started = start_policy(cfg)
    before = held_out(model, test_rows, test_prompts, task, cfg, tokenizer)
    checkpoints = Path(paths.checkpoints) / "rl"
    sampled = checkpoints / f"rollouts-{fingerprint(cfg)}"  # resumed only by the run that sampled them
    result = train_rl(
        model, train_rows, train_prompts, functions, cfg, tokenizer, packed,
        sampled, checkpoints, reference=as_started, on_step=tracking.step_logger(),
    )  # fmt: skip
    after = held_out(model, test_rows, test_prompts, task, cfg, tokenizer)
    scores = held_out_markdown(before, after, cfg)
    with atomic_dir(paths.rl) as out:
        save_adapter(model, out)
        save_tokenizer(tokenizer, out)
        save_config(cfg, out, stage_params(STAGE))
    with atomic_dir(paths.rollouts) as out:
        for batch in sorted(sampled.glob("rollout_*.parquet")):
            shutil.copyfile(batch, out / batch.name)
    metrics_dir = Path(paths.metrics)
    curve = curve_frame(result.pop("curve"))
    curve.to_csv(metrics_dir / "rl_curve.csv", index=False)
    curve_plot(curve, metrics_dir / "rl_curve.png", f"{rl.method} ({rl.loss_type}) on {rl.task}")
    tracking.log_table(rollout_table(Path(paths.rollouts)), "rl_rollouts.json")
    write_text(metrics_dir / "rl_samples.md", samples_markdown(Path(paths.rollouts), rl))
    write_text(metrics_dir / "rl.md", scores["page"])
    result.pop("step_times")
    metrics = {**result, "method": rl.method, "loss_type": rl.loss_type, "task": rl.task, "start": rl.start,
               "packed": packed, "final": curve.iloc[-1].to_dict(), "held_out": scores["held_out"]}  # fmt: skip
    write_json(metrics_dir / "rl.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter and rollouts are safe
    return {"final_reward": metrics["final"].get("reward"), "held_out": scores["held_out"]["accuracy"]}


if __name__ == "__main__":
    sys.exit(run_stage(run))
