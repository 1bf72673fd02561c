#!/usr/bin/env bash
# Create (or update) the project's virtual environment.
#
# torch comes first and on purpose: asked for through another package, pip would fetch the newest
# torch, which on Linux is the CUDA build with gigabytes of CUDA wheels, even on a CPU-only machine.
#   - torch already in the environment: kept as it is.
#   - TORCH_INDEX_URL set: torch from that index (e.g. https://download.pytorch.org/whl/cpu).
#   - an NVIDIA GPU present (nvidia-smi): the default PyPI build, which bundles CUDA.
#   - otherwise: torch==2.13.0, the CPU build where a local wheel provides it.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
REQUIREMENTS=${1:-requirements.txt}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" torch --index-url "$TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.4"
  else
    "${PIP[@]}" "torch==2.13.0"
  fi
fi
"${PIP[@]}" -r "$REQUIREMENTS"
"$PY" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
