"""Preference pairs, rendered and split, with the reference's log-probability of every response → data/pairs.

    python stages/reference.py [key=value ...]    # runs when align != none: make run ARGS="align=dpo"

The reference is the starting policy (align.start: the quantized base with the SFT adapter, or the
base alone), scored once here and cached by DVC: a change of align.beta or align.method reruns only
the `align` stage. Pairs whose question the SFT data holds out (its validation and test questions)
stay held out here too. metrics/reference.json counts the pairs and gives the reference's own
preference accuracy on the held-out ones.
"""

import sys
from pathlib import Path

from lmtune.align.loop import held_out_scores, score_pairs, start_policy, with_own_answers
from lmtune.align.sources import (
    check_held_out,
    labels,
    load_splits,
    question,
    render_splits,
    slots_of,
    write_split,
)
from lmtune.artifacts import atomic_dir, save_config, write_json
from lmtune.checkpoint import load_tokenizer
from lmtune.data.sequences import read_prompts
from lmtune.pipeline.runner import run_stage, stage_params
from lmtune.train.engine import precision

STAGE = Path(__file__).stem  # its params (what its output folder records): dvc.yaml's list


def run(cfg) -> dict:
    paths, a = cfg.paths, cfg.align
    tokenizer = load_tokenizer(paths.base)
    held_out = {
        q["question"].strip()
        for name in ("validation", "test")
        for q in read_prompts(paths.processed, name)
        if q["question"]
    }
    pairs = load_splits(cfg, held_out)

    # the shipped set leaves out its few long pairs, as prepare does long conversations; yours are refused
    splits, seqs, left_out = render_splits(
        pairs, tokenizer, cfg.data.max_length, a.unpaired, drop_long=a.source == "chatterbot"
    )
    check_held_out(splits, a.test_fraction)
    model, packed = start_policy(cfg, trainable=False)  # every pair is checked before the model loads
    autocast, _ = precision(cfg)  # the numerics the align stage trains in, so its rewards start at 0
    own_left_out = {}
    if a.rejected == "own":  # generated answers are the model's, not yours: long ones are left out
        pairs, own_left_out = with_own_answers(model, pairs, tokenizer, a.own_answer_tokens, autocast)
        splits, seqs, own_long = render_splits(
            pairs, tokenizer, cfg.data.max_length, a.unpaired, drop_long=True
        )
        left_out += own_long
        check_held_out(splits, a.test_fraction)
    scores = {
        name: score_pairs(
            model, s, tokenizer.pad_token_id, packed, f"reference {name}", autocast, slots_of(splits[name])
        )
        for name, s in seqs.items()
    }
    with atomic_dir(paths.pairs) as out:
        for name, p in splits.items():
            write_split(out, name, p, seqs[name], scores[name])
        save_config(cfg, out, stage_params(STAGE))
    test = scores["test"]
    metrics = {
        "pairs": {name: len(p) for name, p in splits.items()},
        "held_out_as_the_sft_data_holds_them_out": sum(question(p) in held_out for p in splits["test"]),
        "left_out_longer_than_max_length": left_out,
        "rejected": a.rejected,
        **{f"left_out_{reason}": n for reason, n in own_left_out.items()},
        "response_tokens": {
            name: int(sum(v.sum() for k, v in s.items() if k.endswith("_tokens")))
            for name, s in scores.items()
        },
        "start": a.start,
        "packed": packed,
        "held_out": held_out_scores(test, test, a.beta, 1000, cfg.seed, labels(splits["test"])),
    }
    write_json(Path(paths.metrics) / "reference.json", metrics)
    return {
        "pairs": metrics["pairs"],
        "held_out": {k: v["value"] for k, v in metrics["held_out"].items() if "accuracy" in k},
    }


if __name__ == "__main__":
    sys.exit(run_stage(run))
