"""Running the pipeline's commands in a fresh copy of the repository, as a user would."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots of the UI test (git-ignored)
SECRET = "hf_never_log_this_0123456789"  # set as HF_TOKEN for every command the pipeline runs


def sh(*cmd, cwd, check=True, env=None, timeout=1500):
    """Run a command as the user would, offline, with a secret in the environment that must never be
    logged; the user's own MLFLOW_TRACKING_URI is left out unless `env` sets one. A command still
    running after `timeout` seconds fails the test with what it printed (a hang is a failure)."""
    full = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_TOKEN": SECRET}
    full.pop("MLFLOW_TRACKING_URI", None)
    full.update(env or {})
    try:
        result = subprocess.run(
            [str(c) for c in cmd], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")[-3000:], (err.stderr or b"")[-3000:]
        out = [o.decode(errors="replace") if isinstance(o, bytes) else o for o in out]
        raise AssertionError(
            f"{' '.join(map(str, cmd))} still ran after {timeout} s:\n{out[0]}\n{out[1]}"
        ) from None
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def git(*args, cwd):
    return sh("git", "-c", "user.name=t", "-c", "user.email=t@t", *args, cwd=cwd)


def copy_repo(dest: Path) -> Path:
    """The repository's tracked and new files (not its outputs) as a new git repository."""
    files = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(("metrics/", "dvc.lock")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    sh("git", "init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-qm", "copy", cwd=dest)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    """Poll an MLflow server's /health on this machine until it answers (bounded in time)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, f"{url} did not come up"
            time.sleep(0.5)


def restore(dest) -> None:
    """The copy as the fixture left it (params, dvc.lock, metrics, your data, models from DVC's
    cache), so that tests pass in any order. MLflow's store keeps every run."""
    if sh("git", "status", "--porcelain", cwd=dest).stdout.strip():
        sh("git", "checkout", "-q", "--", ".", cwd=dest)
        sh("git", "clean", "-fdq", cwd=dest)
    sh("dvc", "checkout", "--force", "-q", cwd=dest)


def workspace_hash(dest) -> str:
    """The MLflow run identity of the configuration the copy's params.yaml holds."""
    from lmtune.config import load
    from lmtune.track.run_params import params_hash

    return params_hash(load(root=dest))


@contextmanager
def mlflow_serving(command: str, store: str, *options: str, env: dict | None = None):
    """`mlflow ui` or `mlflow server` (one worker, no job runner) on a free port of 127.0.0.1 over
    `store`; yields its URL once healthy, then stops it."""
    port = free_port()
    server = subprocess.Popen(
        [BIN / "mlflow", command, "--backend-store-uri", store, *options]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**(os.environ if env is None else env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)
