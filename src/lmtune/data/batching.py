"""Token sequences → tensors: padded batches, best-fit packed rows that keep passages apart, and
the seeded order of micro-batches that makes resuming exact."""

from __future__ import annotations

import torch


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
        labels[row, span] = _labels(seq)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _labels(seq: list[int]) -> torch.Tensor:
    """The ids as targets; tokens a Sequence masks out carry no loss (-100)."""
    labels = torch.tensor(seq)
    mask = getattr(seq, "mask", None)
    if mask is not None:
        labels[torch.tensor(mask) == 0] = -100
    return labels


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
            labels[r, start + 1 : end] = _labels(seq)[1:]
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # padding: a segment of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
