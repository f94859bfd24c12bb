"""What each side of `make bench` reports, measured the same way for both."""

import json
import sys

from lmtune.training import peak_memory_gib


def write_side(out: str, side: str, steps: int, useful_tokens: int, seconds: float, val_loss: float) -> dict:
    result = {
        "side": side,
        "steps": steps,
        "useful_tokens": useful_tokens,
        "seconds": seconds,
        "useful_tokens_per_second": useful_tokens / seconds,
        "step_seconds": seconds / steps,
        "peak_memory_gib": peak_memory_gib(),
        "val_loss": val_loss,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2), file=sys.stderr)
    return result
