"""Where preference pairs come from and how they split: the user's files (read by the same loaders
as SFT data), or the set built from the shipped chatterbot conversations; a seeded split that keeps
every prompt in one split."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lmtune.align import AlignError
from lmtune.align.losses import PAIRED_SLOTS, UNPAIRED_SLOTS
from lmtune.align.pairs import example_sequences, pair_sequences, read_pairs
from lmtune.data import DataError
from lmtune.data.sequences import Sequence
from lmtune.data.sources import chatterbot_conversations, records


def load_splits(cfg: DictConfig, held_out: set[str] = frozenset()) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} pairs of align.source, each with `where` it came from; bad
    rows refused by name. `held_out`: questions that must never be trained on (the SFT data's
    validation and test questions)."""
    if cfg.align.source == "chatterbot":
        return chatterbot_splits(cfg.seed, cfg.align.test_fraction, held_out)
    files = OmegaConf.create({**OmegaConf.to_container(cfg.data, resolve=True), "source": "files"})
    files.files = list(cfg.align.files)
    try:
        read = records(files)
    except DataError as err:
        raise AlignError(str(err).replace("data.files", "align.files")) from None
    rows = read_pairs(read, paired=not cfg.align.unpaired)
    if cfg.align.rejected == "own" and any("label" in row for row in rows):
        raise AlignError(
            "align.rejected=own replaces the rejected answer of each pair, and align.files holds unpaired "
            "(prompt/completion/label) rows: give pairs, or set align.rejected=data"
        )
    return split_pairs(rows, cfg.align.test_fraction, cfg.seed, held_out)


def render_splits(
    splits: dict[str, list[dict]], tokenizer, max_length: int, unpaired: bool, drop_long: bool
) -> tuple[dict[str, list[dict]], dict[str, list[tuple]], int]:
    """(the items kept per split, their two sequences each, how many were left out): pairs as (chosen, rejected); with
    `unpaired` (kto) the train split as examples (completion, kl), and the held-out split too when
    it holds any unpaired row (held-out pairs otherwise stay pairs, to be scored as pairs). Long
    items are refused, or left out with `drop_long` (the shipped set)."""
    splits = dict(splits)
    if unpaired:
        for name in ("train", "test") if any("label" in p for p in splits["test"]) else ("train",):
            splits[name] = unpaired_examples(splits[name])
    rendered, left_out = {}, 0
    for split in splits.values():
        pairs = [p for p in split if "label" not in p]
        examples = [p for p in split if "label" in p]
        for items, render in ((pairs, pair_sequences), (examples, example_sequences)):
            if items:
                kept, seqs = render(items, tokenizer, max_length, drop_long)
                rendered |= {id(item): seq for item, seq in zip(kept, seqs, strict=True)}
                left_out += len(items) - len(kept)
    splits = {name: [p for p in split if id(p) in rendered] for name, split in splits.items()}
    return splits, {name: [rendered[id(p)] for p in split] for name, split in splits.items()}, left_out


def unpaired_examples(rows: list[dict]) -> list[dict]:
    """KTO's examples: an unpaired row as it is, a pair as its chosen response (desirable) and its
    rejected one (not), as trl's unpair_preference_dataset makes them; desirable ones first."""
    examples = []
    for row in rows:
        if "label" in row:
            examples.append(row)
            continue
        for side, label in (("chosen", True), ("rejected", False)):
            examples.append(
                {"prompt": row["prompt"], "completion": row[side], "label": label, "where": row["where"]}
            )
    return [e for e in examples if e["label"]] + [e for e in examples if not e["label"]]


def chatterbot_splits(
    seed: int, test_fraction: float, held_out: set[str] = frozenset()
) -> dict[str, list[dict]]:
    """The shipped conversations as pairs: the corpus answer is chosen; the rejected answer is that
    of another question of the same topic and split (a seeded neighbour), fluent and on topic but
    not an answer to this question. What the model must learn is to answer the question asked.
    Questions are split first and answers paired within a split, so that no held-out answer is
    ever a rejected answer in training (that would teach the model to disprefer it)."""
    rows = chatterbot_conversations()
    splits = split_pairs(
        [{"prompt": r["messages"][:-1], "row": r, "where": r["source"]} for r in rows],
        test_fraction,
        seed,
        held_out,
    )
    return {name: _neighbour_pairs([p["row"] for p in split], seed) for name, split in splits.items()}


def _neighbour_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Each conversation's last answer chosen against the answer of the next conversation of its
    topic in a seeded order (the nearest one with a different answer)."""
    by_topic: dict[str, list[dict]] = {}
    for row in rows:
        by_topic.setdefault(row["source"], []).append(row)
    pairs = []
    for topic, group in sorted(by_topic.items()):
        order = list(range(len(group)))
        random.Random(f"{seed}:{topic}").shuffle(order)
        for position, index in enumerate(order):
            messages = group[index]["messages"]
            chosen = messages[-1]["content"]
            others = (
                group[order[(position + k) % len(order)]]["messages"][-1]["content"]
                for k in range(1, len(order))
            )
            rejected = next((text for text in others if text.strip() != chosen.strip()), None)
            if rejected is None:
                continue
            pairs.append(
                {
                    "prompt": messages[:-1],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "where": f"chatterbot:{topic}:{messages[-2]['content'][:40]}",
                }
            )
    return pairs


def split_pairs(
    pairs: list[dict], test_fraction: float, seed: int, held_out: set[str] = frozenset(), minimum: int = 10
) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]}: prompts shuffled by seed, all pairs of one prompt in one split
    (a held-out prompt is never trained on). A pair whose question is in `held_out` (the SFT data's
    validation and test questions) is always held out: preference tuning on it would teach the
    answers the eval stage scores."""
    groups: dict[str, list[dict]] = {}
    for pair in pairs:
        groups.setdefault(repr(pair["prompt"]), []).append(pair)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    forced = [k for k in order if question(groups[k][0]) in held_out]
    rest = [k for k in order if question(groups[k][0]) not in held_out]
    n_test = max(0, max(1, round(len(order) * test_fraction)) - len(forced))
    test, train = forced + rest[:n_test], rest[n_test:]
    split = {"test": [p for k in test for p in groups[k]], "train": [p for k in train for p in groups[k]]}
    check_held_out(split, test_fraction, minimum)
    return split


def check_held_out(split: dict[str, list[dict]], test_fraction: float, minimum: int = 10) -> None:
    """Enough held-out pairs for a meaningful accuracy, and some to train on."""
    if len(split["test"]) < minimum or not split["train"]:
        raise AlignError(
            f"{len(split['train']) + len(split['test'])} preference pairs give {len(split['test'])} held-out "
            f"pairs at align.test_fraction={test_fraction}; at least {minimum} are needed for a meaningful "
            "held-out accuracy (and some to train on): add pairs, or raise align.test_fraction"
        )


def question(pair: dict) -> str:
    """The pair's last user turn: what it asks."""
    return next(m["content"] for m in reversed(pair["prompt"]) if m["role"] == "user").strip()


def slots_of(items: list[dict]) -> tuple[str, str]:
    """The two sequences of each item of a split: a pair's, or a KTO example's (it has a label)."""
    return UNPAIRED_SLOTS if items and "label" in items[0] else PAIRED_SLOTS


def labels(items: list[dict]) -> np.ndarray | None:
    """KTO examples' labels (true: desirable), or None for pairs."""
    return np.asarray([bool(p["label"]) for p in items]) if items and "label" in items[0] else None


def write_split(
    directory: str | Path, name: str, items: list[dict], seqs: list[tuple], reference: dict
) -> None:
    """One split of rendered items and their reference log-probabilities → <directory>/<name>.parquet:
    pairs (chosen, rejected) or KTO's examples (completion, kl, label)."""
    import pandas as pd

    unpaired = "label" in items[0]
    first, second = slots_of(items)
    fields = ("prompt", "completion", "label") if unpaired else ("prompt", "chosen", "rejected")
    columns = {
        "where": [p["where"] for p in items],
        "pair": [json.dumps({k: p[k] for k in fields}) for p in items],
        f"{first}_ids": [list(a) for a, _ in seqs],
        f"{first}_mask": [a.mask for a, _ in seqs],
        f"{second}_ids": [list(b) for _, b in seqs],
        f"{second}_mask": [b.mask for _, b in seqs],
        **{f"reference_{k}": v for k, v in reference.items()},
    }
    if unpaired:
        columns["label"] = [bool(p["label"]) for p in items]
    pd.DataFrame(columns).to_parquet(Path(directory) / f"{name}.parquet", index=False)


def read_split(
    directory: str | Path, name: str
) -> tuple[list[tuple[Sequence, Sequence]], dict[str, np.ndarray]]:
    """A split as the reference stage wrote it: the two sequences of each item ((chosen, rejected),
    or KTO's (completion, kl)) and the reference's log-probabilities of each (with `_tokens`, the
    response lengths), plus the examples' `label` for KTO."""
    import pandas as pd

    path = Path(directory) / f"{name}.parquet"
    if not path.exists():
        raise AlignError(f"{path} not found: run the reference stage first (make run ARGS=align=dpo)")
    frame = pd.read_parquet(path)
    first, second = UNPAIRED_SLOTS if "label" in frame else PAIRED_SLOTS
    seqs = [
        (Sequence(list(ai), list(am)), Sequence(list(bi), list(bm)))
        for ai, am, bi, bm in zip(
            frame[f"{first}_ids"],
            frame[f"{first}_mask"],
            frame[f"{second}_ids"],
            frame[f"{second}_mask"],
            strict=True,
        )
    ]
    reference = {
        c.removeprefix("reference_"): frame[c].to_numpy() for c in frame if c.startswith("reference_")
    }
    if "label" in frame:
        reference["label"] = frame["label"].to_numpy(dtype=bool)
    return seqs, reference
