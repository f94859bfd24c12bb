"""`make run`: params.yaml brought up to date with conf/, `dvc repro`, then every stage's numbers in
this configuration's MLflow run; and, when a stage fails, the metrics DVC removed put back.
`make run ARGS=experiment=smoke` in a workspace holding another profile runs as a DVC experiment in a
temporary copy instead, so a quick look never overwrites the results committed there.

    python -m lmtune.pipeline.repro [key=value ...]

DVC deletes a stage's outputs before it runs the stage, git-tracked metrics/ files included (only
`persist: true` would keep them, and it turns DVC's run-cache off for that stage, which sweeps rely
on). A stage that then fails would leave the last good run's numbers gone while dvc.lock still
describes them. So the files under metrics/ are read before `dvc repro`, and those it removed and no
stage wrote again are written back when it fails: metrics/ and dvc.lock agree again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from lmtune import LmtuneError
from lmtune.pipeline import params
from lmtune.pipeline.lock import pipeline_lock
from lmtune.track import runs as tracking


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def restore_missing(saved: dict[Path, bytes]) -> list[Path]:
    """Write back the saved files that are gone; files a stage wrote meanwhile are left as they are."""
    missing = [path for path in saved if not path.exists()]
    for path in missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(saved[path])
    return missing


def base_will_run(cfg, lock: Path = Path("dvc.lock")) -> bool:
    """Whether `dvc repro` is about to rebuild models/base: its recorded params differ from these,
    or there is no base."""
    if not (Path(cfg.paths.base) / "config.json").is_file():
        return True
    try:
        recorded = yaml.safe_load(lock.read_text())["stages"]["base"]["params"]["params.yaml"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return True
    now = OmegaConf.to_container(cfg, resolve=True)
    return any(recorded.get(key) != now.get(key) for key in ("seed", "model"))


def check_base_obtainable(cfg) -> None:
    """DVC deletes a stage's outputs before running it: a model the base stage cannot get (the hub
    off, a package or folder missing) is refused here, while models/base is still there."""
    from lmtune.base.facts import unavailable

    if base_will_run(cfg) and (problem := unavailable(cfg.model)):
        raise LmtuneError(f"{problem} (nothing ran; {cfg.paths.base} is as it was)")


def main(argv: list[str]) -> int:
    try:
        with pipeline_lock():  # held from before params.yaml is written until the last MLflow sync
            return _run(argv)
    except LmtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


SCRATCH_PROFILES = ("smoke",)  # a first look: never written over the workspace's results


def _run(argv: list[str]) -> int:
    here = params.profile_of(params.read_header(Path(params.PARAMS_FILE))[0])
    if params.profile_of(argv) in SCRATCH_PROFILES and here != params.profile_of(argv):
        return _run_apart(argv)
    cfg = params.update(argv, keep=True)  # composed and validated once, here
    check_base_obtainable(cfg)
    saved = snapshot(Path(cfg.paths.metrics))
    try:
        code = subprocess.call(["dvc", "repro"])
    except KeyboardInterrupt:  # dvc got the Ctrl-C too and stopped its stage
        code = 130
    if code:
        if restored := restore_missing(saved):
            print(
                f"dvc repro failed; put back what DVC had removed before the failing stage ran: "
                f"{', '.join(map(str, sorted(restored)))} (the last good run's, as dvc.lock says)",
                file=sys.stderr,
            )
        return code
    # stages DVC skipped after the last one that ran: their numbers too
    print(f"MLflow run {tracking.sync(cfg).run_id} holds every stage's metrics")
    return 0


def _run_apart(argv: list[str]) -> int:
    """The smoke profile as a DVC experiment in a temporary copy (`dvc exp run --temp`): params.yaml,
    dvc.lock and metrics/ here keep describing the results they hold. Its stages log into the same
    MLflow store (DVC tells them the original root); `dvc exp apply` brings its outputs here."""
    params.compose_conf(argv)  # composed and validated before anything runs
    params.record_profile(argv)
    print(
        f"{' '.join(argv)}: run as a DVC experiment in a temporary copy, so params.yaml, dvc.lock and "
        "metrics/ here stay as they are",
        flush=True,
    )
    try:
        code = subprocess.call(["dvc", "exp", "run", "--temp", *(f"--set-param={a}" for a in argv)])
    except KeyboardInterrupt:
        code = 130
    if code == 0:
        print(
            "see it with `dvc exp show` and `make ui`; `dvc exp apply <name>` puts its params, "
            "dvc.lock, metrics and models into this workspace"
        )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
