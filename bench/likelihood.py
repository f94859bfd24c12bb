"""Eval side of `make bench`: the eval stage's likelihood pass on each model form the default
pipeline writes, through the separate head (decoder on the batch, head on the scored tokens in
chunks) against the model's own whole-batch logits. Per form: tokens/s of each, the speed-up,
the share of this machine's bf16 matmul rate (measured in the same run), and how far apart the
two give each passage's log-likelihood.

    python bench/likelihood.py --passages 96 --out /tmp/likelihood.json
"""

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
from report import matmul_gflops

from lmtune.checkpoint import load_tokenizer
from lmtune.config import load
from lmtune.data.sequences import read_sequences
from lmtune.evaluate.forms import model_loaders
from lmtune.evaluate.scores import likelihood_per_passage, separate_head
from lmtune.model.hardware import resolve_dtype


def timed(model, seqs, batch_size, pad, head_path) -> tuple[dict, float]:
    likelihood_per_passage(model, seqs[:batch_size], batch_size, pad, "warm-up", head_path)
    began = time.perf_counter()
    per = likelihood_per_passage(model, seqs, batch_size, pad, "timed", head_path)
    return per, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=96, help="test sequences scored per form")
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args()
    cfg = load(overrides)
    dtype = resolve_dtype(cfg.eval.dtype)
    tokenizer = load_tokenizer(cfg.paths.base)
    seqs = read_sequences(cfg.paths.processed, "test")[: args.passages]
    pad = tokenizer.pad_token_id
    peak = matmul_gflops()
    params = json.loads((Path(cfg.paths.base) / "source.json").read_text())["parameters"]
    rows = []
    for name, (_, loader) in model_loaders(cfg, dtype).items():
        model = loader()
        if not isinstance(model, torch.nn.Module):  # a GGUF: scored in llama.cpp, not here
            continue
        theirs, their_s = timed(model, seqs, cfg.eval.batch_size, pad, head_path=None)
        ours, our_s = timed(model, seqs, cfg.eval.batch_size, pad, head_path=separate_head(model))
        tokens = float(ours["count"].sum())
        gflops = 2 * params * tokens / our_s / 1e9  # forward: 2 FLOPs per parameter per token
        rows.append(
            {
                "model": name,
                "tokens": tokens,
                "whole_logits_tokens_per_second": tokens / their_s,
                "tokens_per_second": tokens / our_s,
                "speedup": their_s / our_s,
                "gflops": gflops,
                "share_of_matmul_peak": gflops / peak,
                "max_relative_nll_difference": float(
                    np.max(np.abs(ours["nll"] - theirs["nll"]) / theirs["nll"])
                ),
                "perplexity_relative_difference": float(
                    abs(np.exp(ours["nll"].sum() / tokens) / np.exp(theirs["nll"].sum() / tokens) - 1)
                ),
                "top1_hits_differing": int(np.abs(ours["hits"] - theirs["hits"]).sum()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model
        gc.collect()
    result = {"matmul_bf16_gflops": peak, "dtype": str(dtype), "passages": len(seqs), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
