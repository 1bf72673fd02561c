#!/usr/bin/env bash
# Create (or update) the project's virtual environment.
#
# torch is named on purpose: asked for only through another package, pip would fetch the newest
# torch, which on Linux is the CUDA build with gigabytes of CUDA wheels, even on a CPU-only machine.
#   - torch already in the environment at TORCH_FLOOR or newer: kept as it is; an older one is
#     replaced as below (2.10 fixes CVE-2026-24747, the weights_only unpickler).
#   - TORCH_INDEX_URL set: torch from that index (e.g. https://download.pytorch.org/whl/cpu), in a
#     pip call of its own, since that index serves torch and not the other requirements.
#   - an NVIDIA GPU present (nvidia-smi): the default PyPI build, which bundles CUDA.
#   - otherwise: torch==2.13.0, the CPU build where a local wheel provides it.
# Except from TORCH_INDEX_URL, torch is asked for in the same pip call as the requirements: one
# resolution and one install pass instead of two, with the same result.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
REQUIREMENTS=${1:-requirements.txt}

PY="$VENV/bin/python"
# --no-compile: byte-compiling is left to import, or to byte_compile.sh below where Python keeps no
# bytecode (that script says why).
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-compile)
# The venv, made with a current pip where there is none yet (make_venv.sh; the Makefile also runs it on its
# own, so that the oldest-transformers folder can be installed beside the requirements).
VENV="$VENV" PYTHON="$PYTHON" "$BASH" "$(dirname "$0")/make_venv.sh"

TORCH_FLOOR=2.10  # the same floor as pyproject.toml
# Exit status 0 when torch imports and its version is at least TORCH_FLOOR.
TORCH_AT_FLOOR='import re, sys, torch
version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
sys.exit(version < tuple(int(part) for part in sys.argv[1].split(".")))'

TORCH=()  # the torch to ask for beside the requirements: none when the environment's is kept
if ! "$PY" -c "$TORCH_AT_FLOOR" "$TORCH_FLOOR" >/dev/null 2>&1; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "torch $("$PY" -c "import torch; print(torch.__version__)") is older than $TORCH_FLOOR (CVE-2026-24747): upgrading it"
  fi
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "torch>=$TORCH_FLOOR" --index-url "$TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    TORCH=("torch>=$TORCH_FLOOR")
  else
    TORCH=("torch==2.13.0")
  fi
fi
# The environment's packages: one folder in a venv; two where the platform's libraries have their own (lib64).
SITE_PACKAGES='import sysconfig
print("\n".join(sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})))'
mapfile -t SITES < <("$PY" -c "$SITE_PACKAGES")
# Byte-compiled beside the install, each package once pip has written it, then the rest on every core
# (byte_compile.sh says why and how).
# An interrupt, a stop or a failure stops both (a command started with & ignores Ctrl-C in a script).
INSTALL= BESIDE=
trap 'kill $INSTALL $BESIDE 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
"${PIP[@]}" ${TORCH[@]+"${TORCH[@]}"} -r "$REQUIREMENTS" &
INSTALL=$!
"$BASH" "$(dirname "$0")/byte_compile.sh" --beside "$INSTALL" "$PY" "${SITES[@]}" &
BESIDE=$!
wait "$INSTALL"  # pip's exit status: a failed install ends the set-up here
INSTALL=
# Compiling beside only saves time: it is stopped now (bytecode is written whole or not at all), and the
# pass below compiles whatever it left.
kill "$BESIDE" 2>/dev/null || true
wait "$BESIDE" || true
trap - EXIT INT TERM
"$BASH" "$(dirname "$0")/byte_compile.sh" "$PY" "${SITES[@]}"
# What was installed, from the packages' metadata: importing them would take seconds more.
"$PY" -c "from importlib.metadata import version; print(f'torch {version(\"torch\")}, transformers {version(\"transformers\")}')"
