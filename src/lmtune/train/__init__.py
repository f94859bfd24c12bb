"""Training the adapters: the loop (`loop`: validation, guards, rates), one micro-batch (`step`),
exact resume (`checkpoints`), recompute chosen from measured memory (`recompute`), the
packed-attention and chunked-loss kernels (`kernels`), several processes through accelerate
(`distributed`)."""

from lmtune import LmtuneError


class TrainingError(LmtuneError, RuntimeError):
    """Training cannot go on (non-finite loss, a LoRA matrix that never learned, bad checkpoint)."""
