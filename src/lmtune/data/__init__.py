"""Data: the sources (the shipped plays and conversations, your files, a hub dataset), their rows
cut into deterministic splits and token sequences (`sequences`), and batches for training and
scoring (`batching`)."""

from lmtune import LmtuneError


class DataError(LmtuneError, ValueError):
    """Bad input data; the message names the file (and line) and what to do."""
