"""What made an output: the stage's config, the library versions, the commit (and whether the tree
had uncommitted changes) and the machine. Written beside what a stage produced, so that a
`models/merged` found on a shared disk says where it came from:

- `provenance.json` inside each output folder; `.dvcignore` keeps it out of DVC's hashes, so an
  identical run still gives an identical output and a second `dvc repro` stays a no-op;
- `metrics/made_by/<stage>.json` beside the metrics, tracked by git with them;
- the same as tags of the stage's MLflow run (lmtune.track.runs).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmtune.config import select

FILE = "provenance.json"
MADE_BY = "made_by"  # metrics/made_by/<stage>.json
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "torchao",
    "accelerate",
    "llama-cpp-python",
    "lm-eval",
    "dvc",
    "mlflow",
)
CPU_FEATURES = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)  # bf16 speed; llama.cpp's kernels


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# What does not count as code or config: what the pipeline itself writes into git-tracked files
# (dvc.lock; metrics/, cache: false; a stage that runs after another has written them still runs
# the committed code and config), and the documentation (docs/, Markdown anywhere).
NOT_CODE = (
    ":(exclude,top)dvc.lock",
    ":(exclude,top)metrics",
    ":(exclude,top)docs",
    ":(exclude,top,glob)**/*.md",
)


def git_state(cwd: Path | str = ".") -> dict:
    """{commit, dirty, changed}: the commit checked out, and whether (and which) tracked files of
    code or config differ from it; the pipeline's own outputs and the docs do not count."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    changed = git("diff", "HEAD", "--name-only", "--", ":(top)", *NOT_CODE)
    files = sorted(changed.split()) if changed is not None else None
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(files) if files is not None else None,
        "changed": files,
    }


def host() -> dict:
    """The machine: CPU model and the features that set its speed, cores, memory, GPUs, threads and
    processes."""
    cpu, flags = platform.processor() or None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in (None, "", "x86_64"):
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    memory = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    )
    gpus, threads = [], None
    try:
        import torch

        threads = torch.get_num_threads()
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    except ImportError:
        pass
    return {
        "name": platform.node(),
        "cpu": cpu,
        "cpu_features": [f for f in CPU_FEATURES if f in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(memory, 1) if memory else None,
        "gpus": gpus,
        "threads": threads,  # torch's intra-op threads (train.threads, or the cores)
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
    }


def llama_cpp_build() -> dict | None:
    """How llama.cpp was built (install.sh writes its flags into the environment) and, where this
    process has loaded it, the features its CPU backend runs (`AMX_INT8 = 1`, ...)."""
    import sys

    written = Path(sys.prefix) / "llama-cpp-build.json"
    if not written.is_file():
        return None
    found = json.loads(written.read_text())
    if "llama_cpp" in sys.modules:
        found["system_info"] = sys.modules["llama_cpp"].llama_print_system_info().decode().strip()
    return found


def made_by(
    cfg: DictConfig, stage: str, keys: list[str] | tuple[str, ...], ran_with: dict | None = None
) -> dict:
    """Everything above for one stage, with the params it reads (as dvc.yaml lists them) as it ran
    them: a key in `ran_with` ({key: {asked, ran, why}}) holds the value it ran with."""
    ran = OmegaConf.merge(
        cfg, OmegaConf.from_dotlist([f"{k}={v['ran']}" for k, v in (ran_with or {}).items()])
    )
    return {
        "stage": stage,
        "config": select(ran, tuple(keys)),
        "ran_with": ran_with or {},
        "versions": versions(),
        "llama_cpp": llama_cpp_build(),
        "git": git_state(),
        "host": host(),
    }
