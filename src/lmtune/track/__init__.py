"""The record of runs in MLflow: one run per configuration (`runs`), the code and data it came from
(`lineage`), the model registry (`registry`), runs side by side (`compare`). Nothing here changes a
stage's outputs, so no stage depends on it in dvc.yaml."""
