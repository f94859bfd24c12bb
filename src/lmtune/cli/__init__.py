"""The commands around the stages: the stages' shared main (`runner`), composing params.yaml
(`params`), `make run` (`pipeline`), `make chat` (`chat`), the offline plots page (`plots`)."""
