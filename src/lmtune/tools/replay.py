"""`make replay`: retrain the RL adapter from the stored rollouts alone (data/rollouts: prompts,
completions, rewards, advantages, log-probabilities), generating nothing, and compare it with the
adapter the run wrote (models/rl), byte for byte. An audit that needs no sampling setup, no task
and no reward code: only the base, the starting adapter and the rollouts (dvc pull brings them).

    python -m lmtune.tools.replay [key=value ...]     # exit 0: identical; 1: they differ
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

from lmtune import LmtuneError

OUT = Path(".cache") / "replay"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replay(cfg, out: Path = OUT) -> tuple[str, str]:
    """(sha256 of the replayed adapter's weights, of the stored one's)."""
    from lmtune.checkpoint import load_tokenizer
    from lmtune.model.lora import save_adapter
    from lmtune.rl import RLError
    from lmtune.rl.loop import start_policy, train_rl

    stored = Path(cfg.paths.rl) / "adapter_model.safetensors"
    if cfg.rl.method == "none" or not stored.is_file():
        raise RLError(
            f"{stored}: no RL adapter to replay; run the RL stage first (make run ARGS=experiment=rl)"
        )
    tokenizer = load_tokenizer(cfg.paths.base)
    model, packed, _ = start_policy(cfg)
    shutil.rmtree(out, ignore_errors=True)
    train_rl(
        model,
        [],
        [],
        {},
        cfg,
        tokenizer,
        packed,
        Path(cfg.paths.rollouts),
        out / "checkpoints",
        generate=False,
    )
    save_adapter(model, out / "adapter")
    return sha256(out / "adapter" / "adapter_model.safetensors"), sha256(stored)


def main(argv: list[str] | None = None) -> int:
    from lmtune.config import load

    try:
        ours, theirs = replay(load(list(sys.argv[1:] if argv is None else argv)))
    except LmtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ours == theirs:
        print(
            f"identical: the adapter retrained from the stored rollouts is the stored one (sha256 {ours[:16]})"
        )
        return 0
    print(f"differ: retrained {ours[:16]}, stored {theirs[:16]} (see {OUT / 'adapter'})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
