#!/usr/bin/env bash
# Create .venv in the repository and install gammamod with what the demo and the tests need.
# torch comes first and pinned: 2.13.0 is the CPU wheel on disk; a looser pin pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'; }
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
quiet .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
quiet .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all,test]"
# Triton tests (tests/test_triton.py): nvidia-pytriton ships a real tritonserver and its Python backend
# (~145 MiB). Installed without its dependencies: its own proxy pins numpy<2, and we use only the binaries.
# Its Python-backend stub is built against NumPy 1.x, so that interpreter gets a NumPy 1 of its own (~80 MiB).
quiet .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "nvidia-pytriton==0.7.0"
if [ ! -d .venv/triton-python/numpy ]; then
  quiet .venv/bin/python -m pip install -q --disable-pip-version-check --target .venv/triton-python "numpy>=1.26,<2"
fi
.venv/bin/python -c "import torch, gammamod; assert torch.__version__.startswith('2.13.0'), torch.__version__"
