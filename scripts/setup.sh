#!/usr/bin/env bash
# Set up a development environment in .venv: strsparse (editable, which builds its native
# sparse kernels) with its test tools and onnx/onnxruntime,
# a CPU build of PyTorch, and the Fashion-MNIST data the default job trains on.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# strsparse needs torch >= 2.2 and pins nothing more; here we prefer the CPU wheel 2.13.0
# when the machine has it, so pip does not pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "${pip[@]}" "torch==2.13.0" 2>/dev/null || "${pip[@]}" "torch>=2.2"
fi
"${pip[@]}" -e ".[dev,onnx]"

data=/usr/share/datasets/fashion-mnist
if [ ! -e "$data/train-images-idx3-ubyte.gz" ] && [ ! -e "$data/train-images-idx3-ubyte" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if command -v apt-get >/dev/null; then
        $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "Fashion-MNIST is missing: put its four IDX files in a directory and set data.root" >&2
    fi
fi
