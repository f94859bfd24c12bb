"""Scoring models on the test split (`scores`: likelihood, text and answer metrics, intervals, the
report page) and generating from them (`generation`); `text_metrics/` holds the local `evaluate`
metric modules, so scoring runs offline."""
