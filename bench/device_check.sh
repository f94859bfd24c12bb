#!/usr/bin/env bash
# Everything a CUDA machine can check, in one run, from the repo root:
#   make gpu-wheels                      # in lmtune's environment: what that machine lacks, in .whl/
#   bash bench/device_check.sh [ARGS]    # there: the `gpu` tests, then bench/gpu_check.sh ARGS
# For a CUDA machine that has torch, transformers, peft and accelerate but not bitsandbytes,
# omegaconf, hydra, torchao, datasets, evaluate, DVC or MLflow: the wheels (see the Makefile) go to /tmp/site,
# first on the path. The gpu tests run each stage in-process (no DVC, no MLflow). Results land in
# $OUT_DIR (or /tmp/device_check).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-/tmp/device_check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L || echo "no GPU seen by nvidia-smi"
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
# the gpu tests first (a minute or two); the benchmark runs whatever they found
python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/unit/test_gpu_training.py 2>&1 | tee "$out/gpu_tests.log" || true
exec bash bench/gpu_check.sh --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
