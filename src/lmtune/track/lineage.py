"""Which files in metrics/ belong to the configuration being run, read from dvc.yaml and dvc.lock.

While `dvc repro` runs a stage, other stages' metrics files may be stale: a stage further down
still has to run for this configuration. DVC's own status cannot be asked from inside a stage (the
repository is locked), but dvc.lock records what each finished stage read and wrote, so a file
is current when its stage's locked params equal this configuration's, the outputs of other stages
that it read are the ones the lock now records for them, and the file is still what the stage
wrote. Stages downstream of the running one are never current: it is about to change their inputs.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

PIPELINE, LOCK = "dvc.yaml", "dvc.lock"


def _resolve(path: str, cfg: DictConfig) -> str:
    """dvc.yaml's `${paths.metrics}/train.json` → metrics/train.json (its only templating)."""
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(OmegaConf.select(cfg, m[1])), path)


def _paths(entries: list, cfg: DictConfig) -> set[str]:
    names = [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]
    return {_resolve(str(n), cfg).rstrip("/") for n in names}


def stage_files(cfg: DictConfig, root: Path = Path(".")) -> dict[str, dict[str, set[str]]]:
    """Each stage's deps and outputs (outs, metrics, plots) in dvc.yaml, paths resolved."""
    stages = {}
    for name, stage in yaml.safe_load((root / PIPELINE).read_text())["stages"].items():
        if "foreach" in stage:  # align's stages: one per item of the list the config holds, as DVC names them
            items = OmegaConf.select(cfg, stage["foreach"].strip("${}")) or []
            stages |= {f"{name}@{item}": stage["do"] for item in items}
        else:
            stages[name] = stage
    return {
        name: {
            "deps": _paths(stage.get("deps"), cfg),
            "outs": _paths(stage.get("outs"), cfg)
            | _paths(stage.get("metrics"), cfg)
            | _paths(stage.get("plots"), cfg),
        }
        for name, stage in stages.items()
    }


def downstream(stages: dict[str, dict[str, set[str]]], stage: str) -> set[str]:
    """The stages that read what `stage` writes, directly or through others."""
    found: set[str] = set()
    todo = [stage]
    while todo:
        outs = stages[todo.pop()]["outs"]
        for name, files in stages.items():
            if name not in found and files["deps"] & outs:
                found.add(name)
                todo.append(name)
    return found


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _same(locked: Any, current: Any) -> bool:
    return locked == (
        OmegaConf.to_container(current, resolve=True) if OmegaConf.is_config(current) else current
    )


def current_files(cfg: DictConfig, stage: str, files: list[str], root: Path = Path(".")) -> list[str]:
    """Of `files` (paths like metrics/train.json), those that belong to this configuration while
    `stage` runs: its own, and those of other stages that dvc.lock vouches for. Without dvc.yaml
    (a stage run outside the pipeline) every file given that exists counts."""
    if not (root / PIPELINE).is_file():
        return [file for file in files if (root / file).is_file()]
    stages = stage_files(cfg, root)
    stage = next((name for name in stages if name.split("@")[0] == stage), stage)  # align → align@dpo
    lock = yaml.safe_load((root / LOCK).read_text()).get("stages", {}) if (root / LOCK).is_file() else {}
    locked_outs = {
        o["path"].rstrip("/"): o.get("md5") for entry in lock.values() for o in entry.get("outs", [])
    }
    stale = downstream(stages, stage) if stage in stages else set()
    kept = []
    for file in files:
        owner = next((name for name, f in stages.items() if file in f["outs"]), None)
        if owner == stage:
            kept.append(file)
            continue
        entry = lock.get(owner)
        if owner is None or owner in stale or entry is None or not (root / file).is_file():
            continue
        params = entry.get("params", {}).get("params.yaml", {})
        if not all(_same(value, OmegaConf.select(cfg, key)) for key, value in params.items()):
            continue  # run with other params: this configuration has not reached that stage yet
        read = [d for d in entry.get("deps", []) if d["path"].rstrip("/") in locked_outs]
        if any(d.get("md5") != locked_outs[d["path"].rstrip("/")] for d in read):
            continue  # its inputs have been rewritten since
        own = next((o for o in entry.get("outs", []) if o["path"] == file), None)
        if own is None or own.get("md5") != _md5(root / file):
            continue  # the file is not what the stage wrote (edited, or a failed rerun)
        kept.append(file)
    return kept
