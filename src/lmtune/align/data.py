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
from lmtune.align.pairs import read_pairs
from lmtune.data import DataError
from lmtune.data.sequences import Sequence
from lmtune.data.sources import chatterbot_conversations, records


def load_pairs(cfg: DictConfig) -> list[dict]:
    """Every pair of align.source, each with `where` it came from; bad rows refused by name."""
    if cfg.align.source == "chatterbot":
        return chatterbot_pairs(cfg.seed)
    files = OmegaConf.create({**OmegaConf.to_container(cfg.data, resolve=True), "source": "files"})
    files.files = list(cfg.align.files)
    try:
        read = records(files)
    except DataError as err:
        raise AlignError(str(err).replace("data.files", "align.files")) from None
    return read_pairs(read, paired=True)


def chatterbot_pairs(seed: int) -> list[dict]:
    """The shipped conversations as pairs: the corpus answer is chosen; the rejected answer is that
    of another question of the same topic (a seeded neighbour), fluent and on topic but not an
    answer to this question. What the model must learn is to answer the question asked."""
    by_topic: dict[str, list[dict]] = {}
    for row in chatterbot_conversations():
        by_topic.setdefault(row["source"], []).append(row)
    pairs = []
    for topic, rows in sorted(by_topic.items()):
        order = list(range(len(rows)))
        random.Random(f"{seed}:{topic}").shuffle(order)
        for position, index in enumerate(order):
            messages = rows[index]["messages"]
            chosen = messages[-1]["content"]
            # the nearest following neighbour with a different answer
            others = (
                rows[order[(position + k) % len(order)]]["messages"][-1]["content"]
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
                    "where": f"chatterbot:{topic}:{index}",
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
    if len(split["test"]) < minimum or not split["train"]:
        raise AlignError(
            f"{len(pairs)} preference pairs with {len(order)} distinct prompts give {len(split['test'])} held-out "
            f"pairs at align.test_fraction={test_fraction}; at least {minimum} are needed for a meaningful "
            "held-out accuracy: add pairs, or raise align.test_fraction"
        )
    return split


def question(pair: dict) -> str:
    """The pair's last user turn: what it asks."""
    return next(m["content"] for m in reversed(pair["prompt"]) if m["role"] == "user").strip()


def write_split(
    directory: str | Path, name: str, pairs: list[dict], seqs: list[tuple], reference: dict
) -> None:
    """One split of rendered pairs and their reference log-probabilities → <directory>/<name>.parquet."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "where": [p["where"] for p in pairs],
            "pair": [json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) for p in pairs],
            "chosen_ids": [list(c) for c, _ in seqs],
            "chosen_mask": [c.mask for c, _ in seqs],
            "rejected_ids": [list(r) for _, r in seqs],
            "rejected_mask": [r.mask for _, r in seqs],
            **{f"reference_{k}": v for k, v in reference.items()},
        }
    )
    frame.to_parquet(Path(directory) / f"{name}.parquet", index=False)


def read_split(
    directory: str | Path, name: str
) -> tuple[list[tuple[Sequence, Sequence]], dict[str, np.ndarray]]:
    """A split as the reference stage wrote it: (chosen, rejected) sequences and the reference's
    log-probabilities of each (chosen, rejected, chosen_tokens, rejected_tokens)."""
    import pandas as pd

    path = Path(directory) / f"{name}.parquet"
    if not path.exists():
        raise AlignError(f"{path} not found: run the reference stage first (make run ARGS=align=dpo)")
    frame = pd.read_parquet(path)
    seqs = [
        (Sequence(list(ci), list(cm)), Sequence(list(ri), list(rm)))
        for ci, cm, ri, rm in zip(
            frame["chosen_ids"],
            frame["chosen_mask"],
            frame["rejected_ids"],
            frame["rejected_mask"],
            strict=True,
        )
    ]
    reference = {
        c.removeprefix("reference_"): frame[c].to_numpy() for c in frame if c.startswith("reference_")
    }
    return seqs, reference
