"""The configuration reference, read from conf/ itself: every knob with its default and the comment
beside it, and the values the schema allows (lmtune.config). The docs site builds its reference
page from this (docs/hooks.py), and a test checks the comments' option lists against the schema and
the config groups, so neither can drift.

    python -m lmtune.tools.reference            # the reference as Markdown, on stdout
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lmtune.config import ROOT, RULES

CONF = ROOT / "conf"
_LINE = re.compile(r"^(?P<indent> *)(?:- )?(?P<key>[\w@/.]+):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


@dataclass
class Entry:
    file: str  # relative to conf/
    key: str  # dotted, as in params.yaml (the group's name in front)
    value: str
    comment: str


def entries(path: Path, conf: Path = CONF) -> list[Entry]:
    """The keys of one conf/ file with their values and comments (a comment on the lines below a key,
    indented past it, continues it). Keys of `defaults:` keep their group name (`defaults.model`)."""
    rel = path.relative_to(conf)
    section = rel.parts[0] if len(rel.parts) > 1 else ""
    if path.read_text().startswith("# @package _global_"):  # its keys are written from the top
        section = ""
    found: list[Entry] = []
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("# @package"):
            continue
        if line.lstrip().startswith("#"):
            if found and line.startswith(" " * 20):  # a continued comment, aligned under the last one
                found[-1].comment += " " + line.strip().lstrip("#").strip()
            continue
        match = _LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"]) + (2 if line.lstrip().startswith("- ") else 0)
        stack = [(i, k) for i, k in stack if i < indent]
        stack.append((indent, match["key"]))
        dotted = ".".join(k for _, k in stack)
        key = f"{section}.{dotted}" if section else dotted
        found.append(Entry(str(rel), key, match["value"].strip(), (match["comment"] or "").strip()))
    return found


def listed_options(comment: str) -> list[str]:
    """The options a comment lists as `a | b | c` or `a: what it does | b: ...` (a lead-in such as
    "after merge:" before the first is dropped), or [] when it lists none."""
    if " | " not in comment:
        return []
    options = []
    for index, part in enumerate(comment.split("|")):
        head, colon, rest = part.strip().partition(":")
        if colon and len(head.split()) == 1:
            options.append(head)
        elif colon and index == 0:
            options.append(rest.split()[0])
        elif part.split():
            options.append(part.split()[0])
    return [o.strip("`,;()") for o in options]


def allowed(key: str) -> str:
    rule = RULES.get(key, {})
    if "one_of" in rule:
        return " \\| ".join(
            "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in rule["one_of"]
        )
    if "positive" in rule:
        return "> 0"
    if "within" in rule:
        low, high, low_in, high_in, nullable = rule["within"]
        text = f"{'[' if low_in else '('}{low:g}, {'∞' if high == float('inf') else f'{high:g}'}{']' if high_in else ')'}"
        return text + (" or null" if nullable else "")
    return ""


def markdown(conf: Path = CONF) -> str:
    """One table per file of conf/: key, default, allowed values, what it does."""
    out = []
    files = [conf / "config.yaml", *sorted(p for p in conf.glob("*/*.yaml") if p.parent.name != "accelerate")]
    for path in files:
        rel = path.relative_to(conf)
        header = [
            line.lstrip("# ").rstrip()
            for line in path.read_text().splitlines()
            if line.startswith("#") and not line.startswith("# @package")
        ]
        rows = [e for e in entries(path, conf) if e.value or e.comment]
        out.append(f"### `conf/{rel}`\n")
        if header and not path.read_text().startswith(("defaults", "name")):
            out.append(" ".join(header) + "\n")
        out.append("| key | default | allowed | what it does |\n|---|---|---|---|")
        for e in rows:
            cell = e.comment.replace("|", "\\|")
            out.append(f"| `{e.key}` | `{e.value}` | {allowed(e.key)} | {cell} |".replace("``", "` `"))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
