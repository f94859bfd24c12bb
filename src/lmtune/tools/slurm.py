"""`make sweep LAUNCHER=slurm`: one SLURM job per point of a sweep grid (conf/slurm/sweep.sbatch),
each a DVC experiment run in its own clone and pushed to the git and DVC remotes; this side waits with
a progress line, names the log of every failed job, and pulls the finished experiments back, so that
`dvc exp show`, `make compare` and the MLflow UI show them as a local sweep's.

    python -m lmtune.tools.slurm [--sbatch "--partition=gpu --gres=gpu:1"] [--timeout SECONDS] GRID...

The repository (with its .venv) must sit on a filesystem the nodes share, as SLURM's job logs do;
the committed HEAD must be on the git remote, and DVC needs a default remote (the jobs' outputs go
there). MLFLOW_TRACKING_URI, set here, reaches every job.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from lmtune import LmtuneError
from lmtune.pipeline.params import grid_points
from lmtune.tools.sweep import progress_line

SCRIPT = Path("conf/slurm/sweep.sbatch")
RUNS = Path(".slurm")  # logs, status files and each job's clone (git-ignored)
POLL_SECONDS = 10
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SUSPENDED"}


class ClusterError(LmtuneError, RuntimeError):
    """The sweep cannot be submitted as asked, or a job failed."""


def run(*cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """A command's output; its failure, or its absence, as a ClusterError. `env` adds to this one."""
    try:
        full = {**os.environ, **env} if env else None
        result = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, env=full)
    except FileNotFoundError:
        raise ClusterError(
            f"`{cmd[0]}` not found: run this on a machine that can submit SLURM jobs"
        ) from None
    if result.returncode != 0:
        raise ClusterError(f"`{shlex.join(cmd)}` failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout.strip()


def absolute_url(url: str, base: Path) -> str:
    """A remote given as a relative path is relative to `base`; the jobs run elsewhere."""
    return (
        url
        if "://" in url or url.startswith("/") or ":" in url.split("/")[0]
        else str((base / url).resolve())
    )


def remotes(root: Path, git_remote: str) -> tuple[str, str, str]:
    """(git remote URL, DVC default remote URL, HEAD), checked: HEAD committed and on the git remote."""
    git_url = absolute_url(run("git", "remote", "get-url", git_remote, cwd=root), root)
    run("git", "fetch", "-q", git_remote, cwd=root)
    head = run("git", "rev-parse", "HEAD", cwd=root)
    if not run("git", "branch", "-r", "--contains", head, cwd=root):
        raise ClusterError(
            f"HEAD {head[:8]} is not on the git remote {git_remote}: the jobs clone it from there. "
            f"Commit, then `git push {git_remote} HEAD`"
        )
    # params.yaml, dvc.lock and metrics/ are rewritten by runs; every other edit would not reach the jobs
    status = run("git", "status", "--porcelain", "--untracked-files=no", cwd=root).splitlines()
    paths = [line.split(maxsplit=1)[1].split(" -> ")[-1] for line in status]
    edited = [p for p in paths if p not in ("params.yaml", "dvc.lock") and not p.startswith("metrics/")]
    if edited:
        raise ClusterError(
            f"the jobs run the pushed commit, without your edits to {', '.join(edited[:5])}: commit and push "
            "them (or stash them)"
        )
    try:
        name = run("dvc", "remote", "default", cwd=root)
    except ClusterError:  # it fails when none is set
        name = ""
    if not name:
        raise ClusterError(
            "no default DVC remote: the jobs send their outputs there. `dvc remote add -d team /shared/dvc` "
            "(or s3://..., ssh://...)"
        )
    dvc_url = absolute_url(run("dvc", "config", f"remote.{name}.url", cwd=root), root / ".dvc")
    return git_url, dvc_url, head


def submit(
    root: Path, grid: list[str], sbatch: list[str], git_remote: str = "origin", profile: str = "sweep"
) -> dict[str, dict]:
    """One job per grid point on the conf/experiment `profile`; returns experiment name → {job, log,
    status, point}."""
    git_url, dvc_url, head = remotes(root, git_remote)
    sweep = time.strftime("%Y%m%d-%H%M%S")
    runs = (root / RUNS).resolve()
    runs.mkdir(exist_ok=True)
    jobs = {}
    for i, point in enumerate(grid_points(grid)):
        name = f"slurm-{sweep}-{i}"
        log, status = runs / f"{name}.log", runs / f"{name}.status"
        env = {
            "LMTUNE_GIT_REMOTE": git_url,
            "LMTUNE_DVC_REMOTE": dvc_url,
            "LMTUNE_COMMIT": head,
            "LMTUNE_EXP": name,
            "LMTUNE_WORK": str(runs / name),
            "LMTUNE_STATUS": str(status),
            "LMTUNE_SET": " ".join([f"experiment={profile}", *point]),
        }
        command = ["sbatch", "--parsable", f"--job-name=lmtune-{name}", f"--output={log}", *sbatch]
        job = run(*command, str(root / SCRIPT), cwd=root, env=env).split(";")[0]
        jobs[name] = {"job": job, "log": log, "status": status, "point": point}
        print(f"submitted {name} (job {job}): {' '.join(point)}", flush=True)
    return jobs


def states(jobs: dict[str, dict]) -> dict[str, str]:
    """Name → pending | running | done | failed: SLURM's queue while a job is in it (a requeued job
    is pending again), then the exit status the job script wrote."""
    queued = {}
    listing = run("squeue", "-h", "-j", ",".join(j["job"] for j in jobs.values()), "-o", "%i %T")
    for line in listing.splitlines():
        job, state = line.split()
        queued[job] = "running" if state in RUNNING else "pending"
    out = {}
    for name, j in jobs.items():
        if j["job"] in queued:
            out[name] = queued[j["job"]]
        elif j["status"].exists():
            out[name] = "done" if j["status"].read_text().strip() == "0" else "failed"
        else:  # left the queue without a word: cancelled, or killed outside the script
            out[name] = "failed"
    return out


def progress(current: dict[str, str], started: float) -> str:
    counts = Counter(current.values())
    others = {"running": counts["running"], "pending": counts["pending"], "failed": counts["failed"]}
    return progress_line(counts["done"], len(current), others, started)


def wait(jobs: dict[str, dict], poll: float = POLL_SECONDS, timeout: float | None = None) -> dict[str, str]:
    started, shown = time.monotonic(), ""
    while True:
        current = states(jobs)
        line = progress(current, started)
        if line.split(" · ")[0] != shown.split(" · ")[0]:
            print(line, flush=True)
            shown = line
        if all(s in ("done", "failed") for s in current.values()):
            return current
        if timeout is not None and time.monotonic() - started > timeout:
            raise ClusterError(
                f"the sweep did not finish within {timeout:.0f} s; `squeue --me` shows its jobs, "
                f"`scancel --name` stops them"
            )
        time.sleep(poll)


def pull(root: Path, jobs: dict[str, dict], current: dict[str, str], git_remote: str = "origin") -> None:
    """The finished experiments and their outputs from the remotes into this repository."""
    done = [name for name, state in current.items() if state == "done"]
    if done:
        run("dvc", "exp", "pull", git_remote, *done, cwd=root)
    failed = [name for name, state in current.items() if state == "failed"]
    if failed:
        raise ClusterError(
            f"{len(failed)} of {len(current)} jobs failed: "
            + "; ".join(f"{name} (job {jobs[name]['job']}, log {jobs[name]['log']})" for name in failed)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="*", help="the sweep grid: key=v1,v2 ...")
    parser.add_argument("--sbatch", default="", help="sbatch options over conf/slurm/sweep.sbatch's")
    parser.add_argument("--git-remote", default="origin")
    parser.add_argument("--profile", default="sweep", help="the conf/experiment profile of every point")
    parser.add_argument("--poll", type=float, default=POLL_SECONDS)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        jobs = submit(root, args.grid, shlex.split(args.sbatch), args.git_remote, args.profile)
        current = wait(jobs, args.poll, args.timeout)
        pull(root, jobs, current, args.git_remote)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
