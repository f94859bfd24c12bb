"""Preference tuning after SFT (DPO, IPO, SimPO, ORPO): preference pairs read and rendered like SFT
data (`pairs`), the log-probabilities of many responses in one packed row (`logps`), and the losses
with the statistics users know from trl (`losses`)."""

from lmtune import LmtuneError


class AlignError(LmtuneError, ValueError):
    """Preference data or settings the user must fix; the message names the row, field or key."""
