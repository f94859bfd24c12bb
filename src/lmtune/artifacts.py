"""Writing outputs so that a killed stage never leaves something DVC could take as complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmtune.config import select, without_no_output_keys


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output gets the user's usual mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _usual_modes(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def _usual_modes(folder: Path) -> None:
    """Files as the user's umask makes them: some writers (safetensors) create theirs 0600, which
    another account (a serving user) could not read."""
    mask = _umask()
    for item in folder.rglob("*"):
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_config(
    cfg: DictConfig, directory: str | Path, keys: tuple[str, ...], ran_with: dict[str, dict] | None = None
) -> None:
    """Every output directory carries the resolved config that made it: the params its stage reads
    (`keys`, as dvc.yaml lists them), no more, so that equal inputs give byte-equal outputs. Where
    the stage ran with another value than asked (`ran_with`: {key: {asked, ran, why}}), the file
    holds the value it ran with, the asked one and why in a comment on that line. Keys that change
    no output (lmtune.config.NO_OUTPUT_KEYS, such as train.threads) are left out: provenance.json
    beside it says how the stage ran."""
    ran_with = ran_with or {}
    ran = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v['ran']}" for k, v in ran_with.items()]))
    text = OmegaConf.to_yaml(OmegaConf.create(without_no_output_keys(select(ran, keys))))
    write_text(Path(directory) / "config.yaml", _annotated(text, ran_with))


def _annotated(text: str, ran_with: dict[str, dict]) -> str:
    """YAML text with `# asked: <value>; <why>` after the line of each key in `ran_with`."""
    lines, path = text.splitlines(), []
    for i, line in enumerate(lines):
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.strip().split(":", 1)[0]
        path = [*path[:depth], name]
        key = ".".join(path)
        if key in ran_with:
            asked = OmegaConf.to_yaml({"v": ran_with[key]["asked"]}).strip()[3:]
            lines[i] = f"{line}  # asked: {asked}; {ran_with[key]['why']}"
    return "\n".join(lines) + "\n"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
