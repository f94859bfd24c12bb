"""Online RL with verifiable rewards (GRPO family) on the quantized base: a task's prompts
(`tasks`), the rewards that score completions (`rewards`), rollouts sampled from the current policy
and stored as data (`rollouts`), the clipped-ratio losses of trl's GRPOTrainer (`losses`), and
their micro-batch loss on the training engine (`loop`)."""

from lmtune import LmtuneError


class RLError(LmtuneError):
    """An RL setting, task or reward that cannot be used; the message names it and the fix."""
