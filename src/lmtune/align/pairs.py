"""Preference rows in the formats users have → (prompt turns, chosen turns, rejected turns), and
their token sequences rendered by the model's chat template with only the response learned.

Read, per row, whichever of these it is:
- `prompt`, `chosen`, `rejected` as text (the prompt becomes the user turn, each response the
  assistant turn);
- the same three as conversations (trl's conversational format: `prompt` a list of messages,
  `chosen`/`rejected` the assistant turn(s) that follow it);
- `chosen` and `rejected` as whole conversations sharing their prompt turns (UltraFeedback): the
  prompt is everything before the last assistant turn, and must be the same in both;
- ranked Alpaca (`instruction`, optional `input`, `chosen`, `rejected` as text) and ranked ShareGPT
  (`conversations`, `chosen` and `rejected` as {from, value} turns), as LLaMA-Factory writes them;
- KTO's unpaired `prompt`, `completion`, `label` (true: desirable), which a paired loss refuses.
"""

from __future__ import annotations

from lmtune.align import AlignError
from lmtune.data.sequences import Sequence
from lmtune.data.sources import ROLES, SHAREGPT_ROLES


def read_pair(record: dict) -> dict:
    """A record → {"prompt": [...], "chosen": [...], "rejected": [...]} (lists of messages), or
    {"prompt": [...], "completion": [...], "label": bool} for an unpaired (KTO) row. ValueError
    says what is wrong with it."""
    if "completion" in record and "label" in record and "chosen" not in record:
        if not isinstance(record["label"], bool):
            raise ValueError("'label' must be true (a desirable completion) or false")
        return {
            "prompt": _turns(record.get("prompt"), "prompt", "user"),
            "completion": _turns(record["completion"], "completion", "assistant"),
            "label": record["label"],
        }
    missing = [f for f in ("chosen", "rejected") if record.get(f) is None]
    if missing:
        raise ValueError(
            f"no {' or '.join(repr(f) for f in missing)} field (fields: {sorted(record)}); a preference row "
            "holds prompt + chosen + rejected (or KTO's prompt + completion + label)"
        )
    chosen, rejected = record["chosen"], record["rejected"]
    if "conversations" in record:  # ranked ShareGPT: the responses are single {from, value} turns
        prompt = _sharegpt(record["conversations"])
        chosen, rejected = ([_sharegpt([t])[0]] if isinstance(t, dict) else t for t in (chosen, rejected))
    elif "instruction" in record:  # ranked Alpaca
        extra = record.get("input") or ""
        prompt = (
            f"{record['instruction'].strip()}\n\n{extra.strip()}" if extra.strip() else record["instruction"]
        )
        prompt = [{"role": "user", "content": prompt.strip()}]
    elif record.get("prompt") is not None:
        prompt = _turns(record["prompt"], "prompt", "user")
    else:  # whole conversations sharing their prompt turns
        chosen, rejected = _turns(chosen, "chosen", None), _turns(rejected, "rejected", None)
        if chosen[:-1] != rejected[:-1]:
            raise ValueError(
                "'chosen' and 'rejected' differ before their last turn: as whole conversations they "
                "must share the prompt turns and differ only in the final answer"
            )
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    pair = {
        "prompt": prompt,
        "chosen": _turns(chosen, "chosen", "assistant"),
        "rejected": _turns(rejected, "rejected", "assistant"),
    }
    if not any(m["role"] == "user" for m in pair["prompt"]):
        raise ValueError("the prompt has no user turn")
    for name in ("chosen", "rejected"):
        if pair[name][-1]["role"] != "assistant":
            raise ValueError(f"'{name}' must end with an assistant turn (the answer that is compared)")
        if not pair[name][-1]["content"].strip():
            raise ValueError(f"'{name}' is empty")
    if pair["chosen"] == pair["rejected"]:
        raise ValueError("'chosen' and 'rejected' are the same: the pair prefers nothing")
    return pair


def _turns(value, field: str, role: str | None) -> list[dict]:
    """Text (a turn of `role`) or a list of {role, content} messages → messages."""
    if isinstance(value, str):
        if role is None:
            raise ValueError(f"'{field}' is text; without a 'prompt' field it must be a whole conversation")
        return [{"role": role, "content": value}]
    if (
        not isinstance(value, list)
        or not value
        or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        raise ValueError(
            f"'{field}' must be text or a list of {{role: system|user|assistant, content: text}}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES and isinstance(t.get("value"), str)
        for t in turns
    ):
        raise ValueError("ShareGPT turns must be {from: human|gpt|system, value: text}")
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def read_pairs(records: list[tuple[dict | ValueError, str]], paired: bool = True) -> list[dict]:
    """Every record read (each with `where` it came from), or one AlignError naming every bad row
    (the first ten) and what is wrong with it. With `paired`, an unpaired (KTO) row is refused."""
    pairs, problems = [], []
    for record, where in records:
        try:
            if isinstance(record, ValueError):
                raise record
            pair = read_pair(record)
            if paired and "label" in pair:
                raise ValueError(
                    "an unpaired row (prompt + completion + label, KTO's format) given to a paired loss; "
                    "give prompt + chosen + rejected"
                )
            pairs.append({**pair, "where": where})
        except ValueError as err:
            problems.append(f"{where}: {err}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise AlignError("preference data: " + "; ".join(problems[:10]) + more)
    return pairs


def response_sequence(prompt: list[dict], response: list[dict], tokenizer) -> Sequence:
    """prompt + response rendered by the chat template; only the response's tokens are learned."""
    text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    before = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not text.startswith(before):
        raise AlignError(
            "the chat template does not render the prompt as the start of the conversation; "
            "set model.chat_template to one that does"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(start >= len(before)) for start, _ in encoded["offset_mapping"]]
    return Sequence(encoded["input_ids"], mask)


def pair_sequences(
    pairs: list[dict], tokenizer, max_length: int, drop_long: bool = False
) -> tuple[list[dict], list[tuple[Sequence, Sequence]]]:
    """(the pairs kept, their (chosen, rejected) sequences). A pair longer than max_length is
    refused, every one named with the length that would hold them; or, with `drop_long` (the
    shipped set), left out."""
    kept, out, long = [], [], []
    for pair in pairs:
        chosen = response_sequence(pair["prompt"], pair["chosen"], tokenizer)
        rejected = response_sequence(pair["prompt"], pair["rejected"], tokenizer)
        if max(len(chosen), len(rejected)) > max_length:
            long.append((pair["where"], max(len(chosen), len(rejected))))
            continue
        kept.append(pair)
        out.append((chosen, rejected))
    if long and not drop_long:
        longest = max(n for _, n in long)
        raise AlignError(
            f"{len(long)} preference pairs are longer than data.max_length={max_length} tokens, e.g. "
            + ", ".join(f"{where} ({n})" for where, n in long[:5])
            + f": raise data.max_length to {longest}, or shorten or drop them"
        )
    return kept, out


def kl_partners(examples: list[dict]) -> list[int]:
    """For each example, the one whose completion estimates KTO's KL term under its prompt: the
    nearest before it (cyclically) with another prompt, as trl's shift by one within a batch."""
    n = len(examples)
    partners = []
    for i, example in enumerate(examples):
        j = next(
            ((i - k) % n for k in range(1, n) if examples[(i - k) % n]["prompt"] != example["prompt"]), None
        )
        if j is None:
            raise AlignError("kto needs examples of at least two prompts to estimate its KL term")
        partners.append(j)
    return partners


def example_sequences(
    examples: list[dict], tokenizer, max_length: int, drop_long: bool = False
) -> tuple[list[dict], list[tuple[Sequence, Sequence]]]:
    """KTO: (the examples kept, their (completion, kl) sequences): the completion under its own
    prompt, and the KL partner's completion under this prompt (lmtune.align.pairs.kl_partners).
    Long examples are refused or, with `drop_long`, left out, as pair_sequences does."""
    kept, completions, long = [], [], []
    for example in examples:
        seq = response_sequence(example["prompt"], example["completion"], tokenizer)
        if len(seq) > max_length:
            long.append((example["where"], len(seq)))
            continue
        kept.append(example)
        completions.append(seq)
    if long and not drop_long:
        raise AlignError(
            f"{len(long)} preference examples are longer than data.max_length={max_length} tokens, e.g. "
            + ", ".join(f"{where} ({n})" for where, n in long[:5])
            + f": raise data.max_length to {max(n for _, n in long)}, or shorten or drop them"
        )
    partners = kl_partners(kept)
    kl = [
        response_sequence(e["prompt"], kept[j]["completion"], tokenizer)
        for e, j in zip(kept, partners, strict=True)
    ]
    return kept, list(zip(completions, kl, strict=True))
