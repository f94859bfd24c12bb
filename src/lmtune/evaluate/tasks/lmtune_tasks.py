"""Datasets of lmtune's own lm-eval tasks (the YAML files beside this one), from what it ships."""

from __future__ import annotations

import random
from pathlib import Path

DISTRACTORS = 3
LONGEST_ANSWER = (
    200  # characters: the corpus's paragraph-long answers would be chosen (or not) for their length
)


def test_split(processed: str = "data/processed", **_) -> dict:
    """The prepared test split's passages (text), as the eval stage scores them."""
    import datasets
    import pandas as pd

    frame = pd.read_parquet(Path(processed) / "test.parquet", columns=["text"])
    return datasets.DatasetDict({"test": datasets.Dataset.from_pandas(frame, preserve_index=False)})


def chatterbot_choices(seed: int = 0, **_) -> dict:
    """Each first question of a chatterbot conversation with its answer and three other answers
    (answers of up to LONGEST_ANSWER characters)."""
    import datasets

    from lmtune.data.sources import chatterbot_conversations

    pairs, seen = [], set()
    for row in chatterbot_conversations():
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        if question not in seen and len(answer) <= LONGEST_ANSWER:
            seen.add(question)
            pairs.append((question, answer))
    rng = random.Random(seed)
    docs = []
    for question, answer in pairs:
        others = sorted({a for _, a in pairs if a != answer})
        choices = [answer, *rng.sample(others, DISTRACTORS)]
        rng.shuffle(choices)
        docs.append({"question": question, "choices": choices, "label": choices.index(answer)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
