"""The GPU half of `make bench`: the usual QLoRA recipe against lmtune's training loop on a
Llama-2-7B-shaped model with random weights built on the card (nothing is downloaded).

    bash bench/gpu_check.sh                     # a CUDA machine; about 6 minutes on an H100/H200
    python bench/gpu_check.py --tiny --steps 3  # any machine: a small Llama, checks the script

Each side runs in its own process, so its peak memory is its own, on the same synthetic passages
(seeded lengths from 128 to data.max_length tokens, batch 4, like DESIGN.md's reference figures):

- baseline: bench/baseline.py's recipe (HF Trainer, NF4 + double quantization,
  prepare_model_for_kbit_training with gradient checkpointing, padded batches);
- lmtune: lmtune.training.train (packing, per-passage flash attention, chunked loss, bf16
  autocast), NF4, with and without gradient checkpointing.

The checkpointing policy is chosen from memory: lmtune's pick is the faster of its two sides whose
peak stays within the baseline's. Prints a Markdown table; --out writes the numbers as JSON.
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

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}  # fmt: skip
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip
SIDES = {  # name: (script side, gradient checkpointing)
    "baseline": ("baseline", True),
    "lmtune, checkpointing": ("lmtune", True),
    "lmtune, no checkpointing": ("lmtune", False),
}


def build_model(out: Path, shape: dict) -> None:
    """Random weights in bf16, made on the card, saved as a plain checkpoint with a word-level
    tokenizer over the vocabulary (the data is synthetic token ids)."""
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


def passages(count: int, max_length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(128, max_length // 2), max_length + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def settings(args):
    """conf/'s defaults for what train() reads (read with omegaconf alone: the lent GPU machine
    has no Hydra), with this benchmark's shape on top."""
    from omegaconf import OmegaConf

    conf = HERE.parent / "conf"
    default = {group: OmegaConf.load(conf / group / f"{option}.yaml")
               for group, option in (("model", "tiny_random"), ("data", "shakespeare"), ("quant", "nf4"),
                                     ("lora", "default"), ("train", "default"))}  # fmt: skip
    default["seed"] = OmegaConf.load(conf / "config.yaml").seed
    return OmegaConf.merge(
        default,
        {"quant": {"bits": 4, "bnb_4bit_compute_dtype": "bf16" if torch.cuda.is_available() else "auto"},
         "data": {"max_length": args.max_length},
         "train": {"max_steps": args.steps, "batch_size": args.batch_size, "warmup_steps": 1,
                   "eval_batches": 1, "pack_length": max(512, args.max_length)}},
    )  # fmt: skip


def run_side(args) -> None:
    from omegaconf import OmegaConf
    from report import write_side

    from lmtune.modeling import load_tokenizer, resolve_dtype

    cfg = settings(args)
    script_side, checkpointing = SIDES[args.side]
    tokenizer = load_tokenizer(args.model_dir)
    vocab = len(tokenizer)
    seqs = passages(args.steps * args.batch_size, args.max_length, vocab, seed=1)
    val_seqs = passages(args.batch_size, args.max_length, vocab, seed=2)
    if script_side == "baseline":
        from baseline import load_usual, train_usual

        dtype = resolve_dtype(cfg.quant.bnb_4bit_compute_dtype)
        model = load_usual(args.model_dir, dtype, cfg.lora)
        useful, seconds = train_usual(model, tokenizer, seqs, cfg.train, args.steps, cfg.seed, dtype)
    else:
        from lmtune_side import train_lmtune

        cfg = OmegaConf.merge(cfg, {"train": {"gradient_checkpointing": checkpointing}})
        result = train_lmtune(args.model_dir, cfg, seqs, val_seqs, tokenizer.pad_token_id)
        useful, seconds = result["train_tokens"], result["train_seconds"]
    write_side(args.out, args.side, args.steps, useful, seconds, float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small Llama instead of the 7B shape")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args)

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)"
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        build_model(Path(model_dir), TINY if args.tiny else LLAMA2_7B)
        for side in SIDES:
            print(f"== {side}", flush=True)
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, __file__, "--side", side, "--model-dir", model_dir,
                                "--out", out.name, "--steps", str(args.steps), "--batch-size",
                                str(args.batch_size), "--max-length", str(args.max_length)], check=True)  # fmt: skip
                rows.append({"name": side, **json.loads(Path(out.name).read_text())})
    baseline = rows[0]
    within = [r for r in rows[1:] if r["peak_memory_gib"] <= baseline["peak_memory_gib"]]
    pick = max(within or rows[1:2], key=lambda r: r["useful_tokens_per_second"])
    table = [f"{card}, {'tiny Llama' if args.tiny else 'Llama-2-7B shape'}, random weights, NF4, batch "
             f"{args.batch_size} passages of up to {args.max_length} tokens, {args.steps} steps, torch {torch.__version__}",
             "", "| side | useful tokens/s | peak GiB | speed vs baseline | memory vs baseline |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        mark = " (lmtune's pick)" if r is pick else ""
        table.append(f"| {r['name']}{mark} | {r['useful_tokens_per_second']:.0f} | {r['peak_memory_gib']:.1f} | "
                     f"{r['useful_tokens_per_second'] / baseline['useful_tokens_per_second']:.2f}x | "
                     f"{r['peak_memory_gib'] / baseline['peak_memory_gib']:.2f}x |")  # fmt: skip
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"card": card, "tiny": args.tiny, "sides": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
