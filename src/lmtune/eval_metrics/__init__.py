"""Local `evaluate` metric modules (the hub is not reachable): load with evaluate.load(<folder>).

Each folder holds `<name>.py` with one `evaluate.Metric` subclass. They return per-example
scores too, so the evaluate stage can bootstrap confidence intervals over passages.
"""

from pathlib import Path

FOLDER = Path(__file__).parent
