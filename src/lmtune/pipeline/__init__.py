"""The pipeline's core around the stages: the stages' shared main (`runner`), composing conf/ into
params.yaml (`params`), the lock that keeps params.yaml still while a pipeline runs (`lock`), and
`make run` (`repro`: dvc repro, then every stage's numbers into MLflow)."""
