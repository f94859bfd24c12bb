"""Local `evaluate` metric modules (the hub is not reachable): load with evaluate.load(<folder>).

Each folder holds `<name>.py` with one `evaluate.Metric` subclass. They return per-example
scores too, so the eval stage can bootstrap confidence intervals over passages.
"""

from pathlib import Path

FOLDER = Path(__file__).parent


def text_pair_info(description: str):
    """What every module here takes: one prediction and one reference string per example."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description="predictions: list of str; references: list of str (one per prediction)",
        features=datasets.Features(
            {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
        ),
    )
