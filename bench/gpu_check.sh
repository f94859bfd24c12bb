#!/usr/bin/env bash
# The GPU half of `make bench` (see bench/gpu_check.py): on a CUDA machine, in the repo root,
#   bash bench/gpu_check.sh [--steps N] [--lengths 1024 4096] [--profile] [--liger] [--out FILE]
# On a machine without lmtune's environment (say, a CUDA machine with only torch, transformers and peft),
# carry the wheels of `make gpu-wheels` in .whl/: they are installed first, unless
# bench/device_check.sh already did. Bounded to 8 minutes; each length's table prints when done.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec timeout 480 python3 bench/gpu_check.py "$@"
