"""One pipeline at a time in a repository: `make run` and `make params` refuse, before writing
anything, while another of them or a `dvc repro` / `dvc exp run` runs in the same folder.

A second command rewriting params.yaml under a running pipeline would make dvc.lock and MLflow
record params its stages did not use. Two signs are read: lmtune's own lock (an flock on
.dvc/tmp/lmtune.lock, held by `make run` from before it writes params.yaml until its last MLflow
sync), and DVC's (its repository lock, and the rwlock file that names the live process running a
stage). DVC's queue workers run in their own copies of the repository, with their own locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from lmtune import LmtuneError

LOCK_FILE = Path(".dvc") / "tmp" / "lmtune.lock"


class PipelineBusy(LmtuneError, RuntimeError):
    """Another pipeline runs in this repository."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def dvc_running(root: Path = Path(".")) -> str | None:
    """The live DVC command holding this repository, as `PID N: command`, or None."""
    tmp = root / ".dvc" / "tmp"
    try:
        rwlock = json.loads((tmp / "rwlock").read_text() or "{}")
    except (OSError, ValueError):
        rwlock = {}
    holders = [
        *rwlock.get("write", {}).values(),
        *(i for infos in rwlock.get("read", {}).values() for i in infos),
    ]
    for info in holders:
        if isinstance(info, dict) and isinstance(info.get("pid"), int) and _alive(info["pid"]):
            return f"PID {info['pid']}: {info.get('cmd', 'dvc')}"
    if (tmp / "lock").exists():
        import zc.lockfile

        try:
            zc.lockfile.LockFile(str(tmp / "lock")).close()
        except zc.lockfile.LockError:
            return "dvc (it holds .dvc/tmp/lock)"
    return None


@contextlib.contextmanager
def pipeline_lock(root: Path = Path("."), what: str = "params.yaml") -> Iterator[None]:
    """Hold this repository's pipeline lock, or raise PipelineBusy naming who holds it."""
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another lmtune command"
            raise PipelineBusy(_busy(holder, what)) from None
        try:
            if holder := dvc_running(root):
                raise PipelineBusy(_busy(holder, what))
            handle.truncate(0)
            handle.write(f"PID {os.getpid()}: lmtune pipeline\n")
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _busy(holder: str, what: str) -> str:
    return (
        f"a pipeline is running in this repository ({holder}): changing {what} now would record "
        "params in dvc.lock and MLflow that its stages did not use. Wait for it to finish, or stop it."
    )
