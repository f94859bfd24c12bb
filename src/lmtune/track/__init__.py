"""The record of runs in MLflow: one run per configuration (`runs`), where the store is and how it
is opened (`store`), what a run records of its configuration (`run_params`) and of the stages'
metrics files (`stage_metrics`), the code and data it came from (`lineage`), the model registry
(`registry`), runs side by side (`compare`). Nothing here changes a stage's outputs, so no stage
depends on it in dvc.yaml."""
