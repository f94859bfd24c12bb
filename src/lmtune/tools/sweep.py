"""`make sweep`'s runner: DVC's queue workers run the queued experiments until none is left, with a
progress line, a named log for every failure, and an optional deadline.

    python -m lmtune.tools.sweep [--jobs N] [--timeout SECONDS]

Not `dvc exp run --run-all`: its queue worker can stop after one experiment and leave the command
waiting forever with experiments still queued (github.com/treeverse/dvc/issues/8165 and 10562).
This loop asks DVC to start workers whenever experiments wait and fewer than N run; DVC starts only
the workers that are missing, so a live worker is never doubled.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter

from lmtune import LmtuneError

POLL_SECONDS = 5
WAITING = ("Queued", "Running")


class SweepError(LmtuneError, RuntimeError):
    """A queued experiment failed, or the queue did not empty in time."""


def dvc(*args: str) -> str:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SweepError(f"`dvc {' '.join(args)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def queue_tasks(status: str) -> dict[str, str]:
    """Name → state (Queued, Running, Success, Failed, ...) from `dvc queue status`'s table, whose
    rows end in the state and whose second column is the experiment's name."""
    tasks = {}
    for line in status.splitlines():
        cells = line.split()
        if len(cells) >= 4 and cells[0] != "Task" and cells[-1][:1].isupper() and cells[-1].isalpha():
            tasks[cells[1]] = cells[-1]
    return tasks


def progress_line(done: int, total: int, others: dict[str, int], started: float) -> str:
    """`sweep: 1/4 done, 2 running, 1 queued, 0 failed · 3m05s`, for any launcher's states."""
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    rest = "".join(f", {count} {state}" for state, count in others.items())
    return f"sweep: {done}/{total} done{rest} · {minutes}m{seconds:02d}s"


def progress(tasks: dict[str, str], started: float) -> str:
    counts = Counter(tasks.values())
    others = {"running": counts["Running"], "queued": counts["Queued"], "failed": counts["Failed"]}
    return progress_line(counts["Success"], len(tasks), others, started)


def run_queue(jobs: int = 1, timeout: float | None = None, poll: float = POLL_SECONDS) -> dict[str, str]:
    """Start DVC's queue workers and keep them going until no experiment is queued or running;
    returns name → final state. Raises SweepError naming each failed experiment's log command, or
    the experiments still waiting when `timeout` seconds have passed."""
    started, shown, ours = time.monotonic(), "", set()
    while True:
        every = queue_tasks(dvc("queue", "status"))  # earlier sweeps' finished tasks too
        ours |= {name for name, state in every.items() if state in WAITING}
        tasks = {name: state for name, state in every.items() if name in ours}
        waiting = {name: state for name, state in tasks.items() if state in WAITING}
        line = progress(tasks, started)
        if line.split(" · ")[0] != shown.split(" · ")[0] or not waiting:
            print(line, flush=True)
            shown = line
        if not waiting:
            break
        if timeout is not None and time.monotonic() - started > timeout:
            raise SweepError(
                f"the queue did not empty within {timeout:.0f} s; still waiting: "
                + ", ".join(f"{name} ({state})" for name, state in waiting.items())
                + ". `dvc queue logs <name>` shows what each was doing; `dvc queue kill <name>` stops one"
            )
        running = sum(state == "Running" for state in waiting.values())
        if running < jobs and len(waiting) > running:
            out = dvc("queue", "start", "-j", str(jobs))
            if not out.startswith("Started '0'"):
                print(f"  {out.strip()}", flush=True)
        time.sleep(poll)
    failed = [name for name, state in tasks.items() if state == "Failed"]
    if failed:
        raise SweepError(
            f"{len(failed)} of {len(tasks)} experiments failed: "
            + "; ".join(f"{name} (`dvc queue logs {name}`)" for name in failed)
        )
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once (queue workers)")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds before giving up (default: none)"
    )
    args = parser.parse_args(argv)
    try:
        run_queue(args.jobs, args.timeout)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
