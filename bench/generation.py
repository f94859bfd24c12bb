"""Generation side of `make bench`: lmtune's batched greedy decoding (left-padded, KV cache) against
a plain one-prompt-at-a-time `generate` loop, same model, prompts and length. Reports both rates,
the ratio and how many continuations agree token for token.

    python bench/generation.py --prompts 32 --new-tokens 32 --batch-size 16 --out /tmp/gen.json
"""

import argparse
import json
import time

import torch

from lmtune.checkpoint import load_tokenizer
from lmtune.config import load
from lmtune.data.sequences import read_sequences
from lmtune.evaluate.generation import greedy_continuations
from lmtune.model.hardware import resolve_dtype
from lmtune.model.load import load_full


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="fp32", help="fp32: argmax ties cannot flip between the two sides")
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args()
    cfg = load(overrides)
    tokenizer = load_tokenizer(cfg.paths.base)
    seqs = read_sequences(cfg.paths.processed, "test")
    prompts = [s[: args.prompt_tokens] for s in seqs if len(s) > args.prompt_tokens][: args.prompts]
    model = load_full(cfg.paths.base, resolve_dtype(args.dtype))  # speed does not depend on fine-tuning
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    greedy_continuations(model, prompts[:2], 4, pad, eos, 2)  # warm-up, not timed

    began = time.perf_counter()
    loop = [greedy_continuations(model, [p], args.new_tokens, pad, eos, 1, desc="loop")[0] for p in prompts]
    loop_s = time.perf_counter() - began
    began = time.perf_counter()
    batched = greedy_continuations(model, prompts, args.new_tokens, pad, eos, args.batch_size, desc="batched")
    batched_s = time.perf_counter() - began

    result = {
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "loop_tokens_per_second": sum(map(len, loop)) / loop_s,
        "batched_tokens_per_second": sum(map(len, batched)) / batched_s,
        "identical_continuations": sum(a == b for a, b in zip(loop, batched, strict=True)),
    }
    result["speedup"] = result["batched_tokens_per_second"] / result["loop_tokens_per_second"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
