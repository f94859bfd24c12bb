"""The GPU half of `make bench`: the usual QLoRA recipe vs lmtune's finetune loop on one card,
Llama-2-7B's shape with random weights (no download), NF4, LoRA r16 on every linear layer.

    bash bench/gpu_check.sh                        # on a CUDA machine, from the repo root
    python bench/gpu_check.py --tiny --steps 8     # the same script, a small Llama, CPU or GPU

Each side runs in its own process (its own allocator and peak). At the first length: the usual
recipe (bench/baseline.py), lmtune without recompute (its speed ceiling) and lmtune's pick:
gradient_checkpointing=auto with the usual recipe's measured peak as its memory budget, so lmtune
chooses the least recompute that stays within the usual recipe's memory. At the other lengths the
usual recipe and the pick. Rates are steady state: the first --warmup steps (kernel selection,
allocator growth) are reported apart. MFU counts 6 x parameters FLOPs per useful token (the
convention; a frozen base skips its weight gradients, so the work done is nearer 4x, or 6x with
every layer recomputed) over the bf16 matmul rate measured at the start of the same run, and over
the card's datasheet figure where known. Prints Markdown tables; --out writes the numbers as JSON.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
TINY = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}
# dense bf16 tensor-core TFLOP/s from the vendors' datasheets (SXM parts), for a second MFU column
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
BASELINE, CEILING, PICK, LIGER = (
    "usual recipe",
    "lmtune, no recompute",
    "lmtune's pick",
    "lmtune's pick + Liger",
)


def datasheet_tflops(card: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in card), None)


def build_model(out: Path, shape: dict) -> int:
    """Random weights in bf16, made on the card, saved as a plain checkpoint with a word-level
    tokenizer over the vocabulary (the data is synthetic token ids). Returns the parameter count."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(
        **shape, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")), pad_token="t0", eos_token="t1"
    )
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def passages(count: int, max_length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(128, max_length // 2), max_length + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def settings(args):
    """conf/'s defaults for what train() reads (read with omegaconf alone: Hydra is not needed
    on the GPU machine), with this benchmark's shape on top."""
    from omegaconf import OmegaConf

    conf = HERE.parent / "conf"
    default = {
        group: OmegaConf.load(conf / group / f"{option}.yaml")
        for group, option in (
            ("model", "tiny_random"),
            ("data", "shakespeare"),
            ("quant", "nf4"),
            ("lora", "default"),
            ("train", "default"),
        )
    }
    default["seed"] = OmegaConf.load(conf / "config.yaml").seed
    return OmegaConf.merge(
        default,
        {
            "quant": {"bits": 4, "bnb_4bit_compute_dtype": "bf16" if torch.cuda.is_available() else "auto"},
            "data": {"max_length": args.max_length},
            "train": {
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "warmup_steps": 1,
                "eval_batches": 1,
                "pack_length": max(512, args.max_length),
            },
        },
    )


def profiler(args):
    """torch.profiler over three steady steps, when --profile: (on_step hook, report)."""
    if not args.profile:
        return None, lambda: None
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(
        activities=activities, schedule=schedule(wait=args.warmup - 1, warmup=1, active=3, repeat=1)
    )
    prof.start()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"

    def report():
        prof.stop()
        print(f"\ntop kernels over 3 steady steps of {args.side}, at {args.max_length} tokens:")
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=70))

    return (lambda step, record: prof.step()), report


def run_side(args) -> None:
    """One side, in its own process: writes its step times, peak and choice as JSON."""
    from omegaconf import OmegaConf

    from lmtune.checkpoint import load_tokenizer
    from lmtune.model.hardware import resolve_dtype
    from lmtune.train.engine import peak_memory_gib

    cfg = settings(args)
    tokenizer = load_tokenizer(args.model_dir)
    seqs = passages(args.steps * args.batch_size, args.max_length, len(tokenizer), seed=1)
    val_seqs = passages(args.batch_size, args.max_length, len(tokenizer), seed=2)
    on_step, report = profiler(args) if args.side != BASELINE else (None, lambda: None)
    extra = {}
    if args.side == BASELINE:
        from baseline import load_usual, train_usual

        dtype = resolve_dtype(cfg.quant.bnb_4bit_compute_dtype)
        model = load_usual(args.model_dir, dtype, cfg.lora)
        _, _, step_times = train_usual(model, tokenizer, seqs, cfg.train, args.steps, cfg.seed, dtype)
    else:
        from lmtune_side import train_lmtune

        recompute = {"gradient_checkpointing": False}
        if args.side != CEILING:
            recompute = {"gradient_checkpointing": "auto", "memory_budget_gib": args.budget_gib}
        cfg = OmegaConf.merge(cfg, {"train": recompute})
        patch = apply_liger if args.side == LIGER else None
        result = train_lmtune(args.model_dir, cfg, seqs, val_seqs, tokenizer.pad_token_id, on_step, patch)
        step_times = result["step_times"]
        extra = {k: result[k] for k in ("recompute", "measured_peak_gib") if k in result}
    report()
    out = {"side": args.side, "step_times": step_times, "peak_memory_gib": peak_memory_gib(), **extra}
    Path(args.out).write_text(json.dumps(out, indent=2))


def apply_liger(model) -> None:
    """Liger's Triton kernels for RMSNorm, SwiGLU and RoPE on this Llama instance (its fused
    linear cross-entropy is left out: lmtune's chunked loss does that job)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model.get_base_model(),
    )


def table(rows: list[dict], parameters: int, peak: float, sheet: float | None) -> list[str]:
    base = rows[0]
    lines = [
        "| side | steady tokens/s | warm-up tokens/s | peak GiB | speed vs usual | memory vs usual "
        f"| MFU (measured {peak:.3g} TFLOP/s) |" + (f" MFU (datasheet {sheet:.0f}) |" if sheet else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if sheet else ""),
    ]
    for r in rows:
        flops = 6 * parameters * r["steady"] / 1e12
        name = r["side"] + (f" ({r['recompute']})" if "recompute" in r else "")
        lines.append(
            f"| {name} | {r['steady']:.0f} | {r['warmup']:.0f} | {r['peak_memory_gib']:.1f} | "
            f"{r['steady'] / base['steady']:.2f}x | {r['peak_memory_gib'] / base['peak_memory_gib']:.2f}x | "
            f"{flops / peak:.1%} |" + (f" {flops / sheet:.1%} |" if sheet else "")
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small Llama instead of the 7B shape")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the steady rate")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="longest passage")
    parser.add_argument("--batch-size", type=int, default=4, help="passages per step")
    parser.add_argument("--profile", action="store_true", help="print the pick's top kernels (first length)")
    parser.add_argument(
        "--liger", action="store_true", help="also the pick with Liger's kernels (first length)"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget-gib", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves no steady step of --steps {args.steps}")

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)"
    from report import matmul_gflops

    from lmtune.train.engine import steady_rate

    peak = matmul_gflops(8192 if torch.cuda.is_available() else 1024) / 1000  # TFLOP/s
    sheet = datasheet_tflops(card)
    print(
        f"{card}: bf16 matmul {peak:.3g} TFLOP/s measured now"
        + (f", {sheet:.0f} on the datasheet" if sheet else "")
    )
    results = {
        "card": card,
        "torch": torch.__version__,
        "matmul_tflops": peak,
        "datasheet_tflops": sheet,
        "tiny": args.tiny,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "lengths": {},
    }
    with tempfile.TemporaryDirectory() as model_dir:
        parameters = build_model(Path(model_dir), TINY if args.tiny else LLAMA2_7B)
        results["parameters"] = parameters
        for i, length in enumerate(args.lengths):
            sides = (
                [BASELINE, CEILING, PICK] + ([LIGER] if args.liger else []) if i == 0 else [BASELINE, PICK]
            )
            rows = []
            for side in sides:
                print(f"== {side}, passages up to {length} tokens", flush=True)
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    command = [
                        sys.executable,
                        __file__,
                        "--side",
                        side,
                        "--model-dir",
                        model_dir,
                        "--out",
                        out.name,
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--batch-size",
                        str(args.batch_size),
                        "--max-length",
                        str(length),
                    ]
                    if side in (PICK, LIGER):
                        command += ["--budget-gib", str(rows[0]["peak_memory_gib"])]
                    if args.profile and side == PICK and i == 0:
                        command.append("--profile")
                    if subprocess.run(command).returncode:
                        print(f"   {side} failed (above); left out", flush=True)
                        continue
                    row = json.loads(Path(out.name).read_text())
                rate = steady_rate(row["step_times"], args.warmup)
                row["warmup"], row["steady"] = (
                    rate["warmup_tokens_per_second"],
                    rate["steady_tokens_per_second"],
                )
                rows.append(row)
            if not rows or rows[0]["side"] != BASELINE:
                sys.exit("the usual recipe failed: nothing to compare with")
            results["lengths"][length] = rows
            pick = next((r for r in rows if r["side"] == PICK), None)
            report = [
                f"\n{card}, {'tiny Llama' if args.tiny else 'Llama-2-7B shape'}, random weights, NF4, "
                f"{args.batch_size} passages of {min(128, length // 2)}-{length} tokens per step, "
                f"{args.steps} steps ({args.warmup} warm-up), torch {torch.__version__}",
                "",
            ]
            report += table(rows, parameters, peak, sheet)
            if pick:
                speed = pick["steady"] / rows[0]["steady"]
                memory = pick["peak_memory_gib"] / rows[0]["peak_memory_gib"]
                verdict = "met" if speed >= 2.0 and memory <= 1.0 else "not met"
                report.append(
                    f"\nlmtune's pick: {speed:.2f}x the usual recipe's tokens/s at {memory:.2f}x its "
                    f"peak memory (target: >= 2.00x at <= 1.00x: {verdict})"
                )
            print("\n".join(report), flush=True)  # each length as soon as it is done: a timeout keeps it
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
