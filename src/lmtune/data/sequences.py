"""Rows → deterministic splits → token sequences: windows of long text, rendered conversations
with their answer mask; and reading back what prepare wrote.

A `Sequence` is a list of token ids that may carry a loss mask: 1 where a token is learned and
scored (a conversation's assistant turns; the new part of an overlapping window), 0 elsewhere."""

from __future__ import annotations

import random
from pathlib import Path

from lmtune.data import DataError
from lmtune.data.sources import has_tool_use

SPLITS = ("train", "validation", "test")


class Sequence(list):
    """The token ids of one example, and which of them carry loss (`mask`, 1 = learned and scored;
    None = every token). A list, so packing, batching and slicing treat it as the ids it is."""

    def __init__(self, ids: list[int], mask: list[int] | None = None):
        super().__init__(ids)
        self.mask = mask


def group_key(row: dict, index: int) -> str:
    """Rows with one key go to one split: a conversation's prompt (the same question with other
    answers must not be trained on and then tested), else the row itself."""
    return repr(row["messages"][:-1]) if "messages" in row else str(index)


def split(
    rows: list[dict],
    seed: int,
    validation_fraction: float,
    test_fraction: float,
    max_samples: int | None = None,
) -> dict[str, list[dict]]:
    """Shuffle groups by seed and cut into train/validation/test; the same seed gives the same split."""
    groups: dict[str, list[dict]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(group_key(row, index), []).append(row)
    order = list(groups)
    random.Random(seed).shuffle(order)
    if max_samples:
        order = order[:max_samples]
    n_val = max(1, round(len(order) * validation_fraction))
    n_test = max(1, round(len(order) * test_fraction))
    if len(order) - n_val - n_test < 1:
        if len(order) < len(rows):  # conversations grouped by prompt
            raise DataError(
                f"only {len(order)} distinct prompts among {len(rows)} conversations: too few for "
                "train/validation/test, since conversations with the same prompt stay in one split "
                "(a test prompt is never trained on). Give each example its own prompt (Alpaca: its "
                "'input' is part of the prompt), or add data"
            )
        raise DataError(
            f"only {len(order)} examples: too few for train/validation/test; add data (a .txt "
            "file holds one passage per block of lines, blocks separated by a blank line)"
        )
    pick = lambda keys: [row for key in keys for row in groups[key]]  # noqa: E731
    return {
        "validation": pick(order[:n_val]),
        "test": pick(order[n_val : n_val + n_test]),
        "train": pick(order[n_val + n_test :]),
    }


def text_windows(text: str, tokenizer, max_length: int, stride: int) -> list[Sequence]:
    """A passage as windows of at most `max_length` tokens, each starting `stride` after the one
    before, so nothing is cut off. Where windows overlap, the repeated tokens are context only
    (mask 0): every token is learned and scored once. The last window ends with EOS."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    if len(ids) <= max_length:
        return [Sequence(ids)]
    starts = list(range(0, len(ids) - max_length, stride)) + [len(ids) - max_length]
    windows, covered = [], 0
    for start in starts:
        end = start + max_length
        windows.append(Sequence(ids[start:end], [0 if i < covered else 1 for i in range(start, end)]))
        covered = end
    return windows


def chat_sequence(messages: list[dict], tokenizer, tools: list[dict] | None = None) -> Sequence:
    """A conversation rendered by the model's chat template (with the tool schemas it declares);
    only the assistant turns carry loss, every one of them: the tool calls they make, and the
    template's own end-of-turn marker, so the model learns to stop."""
    render = lambda turns, **kw: tokenizer.apply_chat_template(turns, tokenize=False, tools=tools, **kw)  # noqa: E731
    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and i > 0:
            before, through = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
            if not (text.startswith(before) and text.startswith(through)):
                raise DataError(
                    "the chat template does not render a conversation turn by turn; "
                    "set model.chat_template to one that does"
                )
            spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoded["offset_mapping"]]
    return Sequence(encoded["input_ids"], mask)


def chat_prompt(messages: list[dict], tokenizer, tools: list[dict] | None = None) -> list[int]:
    """The conversation up to its last answer, ready for the model to answer."""
    text = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True, tools=tools
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# A conversation that calls a tool, rendered to see whether a template writes tool use out at all:
# a template without tool support drops the call (or fails), and training on it would teach answers
# to questions the model never sees.
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "lmtune_probe_lookup",
        "description": "look a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}
_PROBE = [
    {"role": "user", "content": "What does probe mean?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "lmtune_probe_lookup", "arguments": {"word": "probe"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "lmtune_probe_result"},
    {"role": "assistant", "content": "It means a test."},
]


def tool_support_problem(tokenizer) -> str | None:
    """Why this chat template cannot train on tool use (it fails on, or leaves out, a tool schema,
    an assistant's tool call or a tool's answer), or None where it renders all three."""
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False, tools=[_PROBE_TOOL])
    except Exception as err:  # a Jinja template's own error: any kind
        return f"its chat template fails on a tool call ({type(err).__name__}: {str(err)[:120]})"
    left_out = [
        what
        for what, marker in (
            ("the tool schemas", "look a word up"),
            ("the assistant's tool calls", '"word"'),
            ("the tool's answers", "lmtune_probe_result"),
        )
        if marker not in text
    ]
    return f"its chat template leaves out {', '.join(left_out)}" if left_out else None


def require_tool_support(rows: list[dict], tokenizer, model_name: str) -> None:
    """Rows that call tools (or declare them) need a template that writes tool use out: refused,
    naming the source and the way out, before any of them is tokenized."""
    with_tools = next((row for row in rows if has_tool_use(row)), None)
    if with_tools and (problem := tool_support_problem(tokenizer)):
        raise DataError(
            f"{with_tools['source']}: conversations with tool calls or tools, but {model_name} has no tool "
            f"support: {problem}. Fine-tune a model whose template has tool use (model=qwen3_8b or "
            "model=llama3_8b), or drop those rows"
        )


def _frame(processed_dir: str | Path, name: str):
    import pandas as pd

    path = Path(processed_dir) / f"{name}.parquet"
    if not path.exists():
        raise DataError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return pd.read_parquet(path)


def read_sequences(processed_dir: str | Path, name: str) -> list[Sequence]:
    """A split's token sequences as prepare wrote them (windows, rendered conversations)."""
    frame = _frame(processed_dir, name)
    return [
        Sequence(list(ids), list(mask) if mask is not None and min(mask) == 0 else None)
        for ids, mask in zip(frame["input_ids"], frame["loss_mask"], strict=True)
    ]


def read_prompts(processed_dir: str | Path, name: str) -> list[dict]:
    """A conversation split's questions, once each, with every answer given to it in the split:
    [{"prompt_ids", "prompt" (as rendered), "question" (the last user turn), "references"}].
    Empty for plain text."""
    frame = _frame(processed_dir, name)
    found: dict[str, dict] = {}
    columns = ("prompt_ids", "prompt", "question", "reference")
    for ids, prompt, question, reference in zip(*(frame[c] for c in columns), strict=True):
        if prompt is None:
            continue
        entry = found.setdefault(
            prompt, {"prompt_ids": list(ids), "prompt": prompt, "question": question, "references": []}
        )
        entry["references"].append(reference)
    return list(found.values())


def tokenize(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per passage, cut at max_length and ending with EOS (tests and benchmarks; prepare
    makes windows instead, see text_windows)."""
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length - 1)["input_ids"]
    return [seq + [tokenizer.eos_token_id] for seq in ids]
