"""`make bench`: the usual QLoRA recipe and lmtune's finetune, one after the other on this machine,
same model, data, LoRA config, sequence length, batch and steps. Prints both sides and the ratios;
then generation, eval's likelihood pass on every model form (bench/likelihood.py), preference
tuning, trl's DPOTrainer against lmtune's align loop (bench/preference.py), and RL, trl's
GRPOTrainer against lmtune's RL loop (bench/rl.py); writes
metrics/bench.json and bench/RESULTS.md.

    python bench/run.py --steps 10
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import matmul_gflops

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SIDES = [  # (name, script, overrides): the baseline, then lmtune with each lever on or off
    ("baseline", "baseline.py", []),
    # what the usual recipe is usually run with: LoRA dropout 0.05 (QLoRA paper); lmtune's default is 0
    ("baseline, lora_dropout=0.05", "baseline.py", ["lora.lora_dropout=0.05"]),
    ("lmtune, padded batches", "lmtune_side.py", ["train.packing=false"]),
    ("lmtune (default: packing)", "lmtune_side.py", []),
]
HAND_WRITTEN = "<!-- everything below is kept when make bench rewrites the table above -->"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def run_json(script: str, *args: str) -> dict:
    """Run a bench script in its own process (its peak memory its own) and read the JSON it writes."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, str(HERE / script), "--out", out.name, *args], check=True, cwd=ROOT)
        return json.loads(Path(out.name).read_text())


def train_sides(sides: list, steps: int, overrides: list[str]) -> list[dict]:
    """Each side in its own process: the baseline trains `steps` steps; each lmtune side then
    trains on the same budget of useful tokens."""
    rows = []
    for name, script, side_overrides in sides:
        budget = (
            ["--steps", str(steps)]
            if script == "baseline.py"
            else ["--tokens", str(rows[0]["useful_tokens"])]
        )
        print(f"== {name}", flush=True)
        rows.append({"name": name, **run_json(script, *budget, *side_overrides, *overrides)})
    return rows


def with_ratios(rows: list[dict], parameters: int, peak: float) -> list[dict]:
    """Speed and memory against the first row (the baseline), and the share of the matmul peak."""
    for row in rows:
        row["speedup"] = row["useful_tokens_per_second"] / rows[0]["useful_tokens_per_second"]
        row["memory_ratio"] = row["peak_memory_gib"] / rows[0]["peak_memory_gib"]
        row["val_perplexity"] = math.exp(row["val_loss"])
        # frozen base: forward 2N + input-gradient backward 2N FLOPs per token (LoRA adds ~3%)
        row["gflops"] = 4 * parameters * row["useful_tokens_per_second"] / 1e9
        row["share_of_matmul_peak"] = row["gflops"] / peak
    return rows


def side_table(rows: list[dict]) -> list[str]:
    table = [
        "| side | steps | useful tokens | useful tokens/s | step s | peak GiB | val perplexity | speed vs baseline | memory vs baseline | share of bf16 matmul peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['name']} | {r['steps']} | {r['useful_tokens']} | {r['useful_tokens_per_second']:.0f} | {r['step_seconds']:.1f} | "
            f"{r['peak_memory_gib']:.1f} | {r['val_perplexity']:.1f} | {r['speedup']:.2f}x | "
            f"{r['memory_ratio']:.2f}x | {r['share_of_matmul_peak']:.0%} |"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--shape", default="smollm2_1.7b", help="a larger shape, random weights (bench/shapes.py); none: skip"
    )
    parser.add_argument("--shape-steps", type=int, default=2, help="the baseline's steps on that shape")
    args, overrides = parser.parse_known_args()
    params = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json;from lmtune.config import load;"
                "from omegaconf import OmegaConf as O;print(json.dumps(O.to_container(load())))",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    )
    base_params = json.loads((ROOT / params["paths"]["base"] / "source.json").read_text())["parameters"]
    rows = train_sides(SIDES, args.steps, overrides)
    shape_rows = []
    if args.shape != "none":
        from shapes import shaped_base

        folder = shaped_base(args.shape, ROOT / params["paths"]["base"])
        print(f"== the {args.shape} shape (random weights, {folder})", flush=True)
        # no warmup: in a couple of steps, a warmup's first step at lr 0 would leave LoRA's A matrices
        # without a gradient (B is still 0), which lmtune's unchanged-matrix guard refuses
        shape_rows = train_sides(
            [SIDES[0], SIDES[-1]],
            args.shape_steps,
            [*overrides, f"paths.base={folder}", "train.warmup_steps=0"],
        )
    print("== generation: batched vs one prompt at a time", flush=True)
    generation = run_json("generation.py", *overrides)
    print("== eval's likelihood pass: separate head vs whole-batch logits, every model form", flush=True)
    likelihood = run_json("likelihood.py", *overrides)
    print("== preference tuning: trl's DPOTrainer vs lmtune's align loop", flush=True)
    preference = [run_json("preference.py", "--side", side, *overrides) for side in ("trl", "lmtune")]
    print("== RL with verifiable rewards: trl's GRPOTrainer vs lmtune's RL loop", flush=True)
    reinforcement = [run_json("rl.py", "--side", side, *overrides) for side in ("trl", "lmtune")]
    peak = matmul_gflops()
    rows = with_ratios(rows, base_params, peak)
    if shape_rows:
        shape_params = json.loads((Path(folder) / "source.json").read_text())["parameters"]
        shape_rows = with_ratios(shape_rows, shape_params, peak)
    report = {
        "machine": machine(),
        "matmul_bf16_gflops": peak,
        "steps": args.steps,
        "batch_size": params["train"]["batch_size"],
        "max_length": params["data"]["max_length"],
        "model": params["model"]["name"],
        "sides": rows,
        "shape": {"name": args.shape, "steps": args.shape_steps, "sides": shape_rows} if shape_rows else None,
        "generation": generation,
        "likelihood": likelihood,
        "preference": preference,
        "rl": reinforcement,
    }
    (ROOT / "metrics").mkdir(exist_ok=True)
    (ROOT / "metrics" / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = side_table(rows)
    if shape_rows:
        table += [
            "",
            f"The same on the {args.shape} shape (random weights, {shape_params / 1e9:.2f} B parameters; the "
            f"baseline trains {args.shape_steps} steps, lmtune the same budget of useful tokens):",
            "",
            *side_table(shape_rows),
        ]
    table += [
        "",
        f"Eval's likelihood pass ({likelihood['passages']} test sequences, {likelihood['dtype']}, the eval stage's "
        f"batch; bf16 matmul in that run: {likelihood['matmul_bf16_gflops']:.0f} GFLOP/s):",
        "",
        "| model | tokens/s, whole-batch logits | tokens/s, separate head | speed-up | share of bf16 matmul peak "
        "| perplexity apart | top-1 hits apart |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in likelihood["rows"]:
        table.append(
            f"| {r['model']} | {r['whole_logits_tokens_per_second']:.0f} | {r['tokens_per_second']:.0f} | "
            f"{r['speedup']:.2f}x | {r['share_of_matmul_peak']:.0%} | {r['perplexity_relative_difference']:.1e} | "
            f"{r['top1_hits_differing']} |"
        )
    usual = preference[0]
    table += [
        "",
        f"Preference tuning (DPO, a fresh adapter on the same NF4 base, {usual['steps']} steps of "
        f"{usual['pairs_per_step']} pairs of the shipped set): trl's DPOTrainer with peft, which computes the "
        "reference at every step, against lmtune's align loop, packed, with the reference scored once "
        "beforehand (the reference stage's work, timed apart):",
        "",
        "| side | useful tokens | useful tokens/s | reference scored once, s | peak GiB | speed vs trl | last step's reward accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in preference:
        table.append(
            f"| {r['side']} | {r['useful_tokens']} | {r['useful_tokens_per_second']:.0f} | {r['reference_seconds']:.1f} | "
            f"{r['peak_memory_gib']:.1f} | {r['useful_tokens_per_second'] / usual['useful_tokens_per_second']:.2f}x | "
            f"{r['final_reward_accuracy']:.2f} |"
        )
    usual = reinforcement[0]
    table += [
        "",
        f"RL with verifiable rewards (GRPO, DAPO's token averaging, a fresh adapter on the same NF4 base, "
        f"{usual['steps']} steps of {usual['completions_per_step']} completions of up to "
        "24 tokens, experiment=rl's one-digit sums): trl's GRPOTrainer with peft against lmtune's RL loop, "
        "both generating with transformers; completion tokens per second end to end (sampling, scoring, training):",
        "",
        "| side | completion tokens | completion tokens/s | of which sampling, s | peak GiB | speed vs trl "
        "| memory vs trl | mean reward, last 3 steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reinforcement:
        sampling = "—" if r["generation_seconds"] is None else f"{r['generation_seconds']:.0f}"
        table.append(
            f"| {r['side']} | {r['completion_tokens']} | {r['completion_tokens_per_second']:.0f} | {sampling} | "
            f"{r['peak_memory_gib']:.1f} | {r['completion_tokens_per_second'] / usual['completion_tokens_per_second']:.2f}x | "
            f"{r['peak_memory_gib'] / usual['peak_memory_gib']:.2f}x | {r['reward_last_steps']:.2f} |"
        )
    text = "\n".join(table)
    print(text)
    results = HERE / "RESULTS.md"
    kept = results.read_text().partition(HAND_WRITTEN)[2] if results.exists() else ""
    results.write_text(
        f"# Benchmark results\n\n`python bench/run.py --steps {args.steps}` (`make bench`), "
        f"{time.strftime('%Y-%m-%d')}.\n\nMachine: {report['machine']}. bf16 2048² matmul: {peak:.0f} GFLOP/s.\n"
        f"Model {report['model']}, batch {report['batch_size']} passages, max {report['max_length']} tokens "
        f"(lmtune packs them with {params['train']['attention']} attention), "
        f"LoRA r{params['lora']['r']} all-linear (dropout {params['lora']['lora_dropout']}), NF4 + double quantization. "
        f"The baseline trains {args.steps} steps; each lmtune side trains as many steps as the same budget of "
        "useful tokens needs.\n\n"
        f"{text}\n\nPeak memory is the process's peak RSS on CPU (allocated memory on GPU). Useful tokens "
        "exclude padding. FLOP share counts 4 x base parameters per token.\n\n"
        f"Generation (base model, {generation['dtype']}, greedy, {generation['prompts']} prompts x "
        f"{generation['new_tokens']} new tokens): one prompt at a time {generation['loop_tokens_per_second']:.0f} "
        f"tokens/s; batched by {generation['batch_size']} with the KV cache "
        f"{generation['batched_tokens_per_second']:.0f} tokens/s (**{generation['speedup']:.1f}x**); "
        f"{generation['identical_continuations']} of {generation['prompts']} continuations identical.\n\n"
        f"{HAND_WRITTEN}{kept}"
    )


if __name__ == "__main__":
    main()
