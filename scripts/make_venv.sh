#!/usr/bin/env bash
# Make the project's virtual environment, with a current pip and nothing else (scripts/setup_env.sh installs
# the rest). A venv that exists is left as it is; one that cannot be made whole is removed again.
#
# A new venv gets a current pip: the one its Python was released with (23.2 with 3.11.7) finds the
# requirements with more work (docs/development.md gives the times). The base Python's pip installs it into a
# venv made without one (`--python`, pip 22.3 or newer), a few seconds sooner than the venv's bundled pip and
# an upgrade of it. Where that fails, the venv gets its bundled pip (ensurepip) and upgrades it; where no
# current pip can be had, the bundled one does the same work, only slower.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
PY="$VENV/bin/python"
CURRENT_PIP="pip>=25,<27"  # the releases tested
INSTALL=(install --quiet --disable-pip-version-check --no-compile)

[ ! -x "$PY" ] || exit 0
# A venv left half made would pass for a whole one next time (its python exists): remove what this made.
[ -e "$VENV" ] || trap 'rm -rf -- "$VENV"; echo "error: the venv $VENV could not be made" >&2' ERR
"$PYTHON" -m venv --without-pip "$VENV"
if ! "$PYTHON" -m pip --python "$PY" "${INSTALL[@]}" "$CURRENT_PIP"; then
  echo "the base Python's pip could not install pip into the venv; the venv's bundled pip is used instead"
  "$PY" -m ensurepip --upgrade >/dev/null
  "$PY" -m pip "${INSTALL[@]}" --upgrade "$CURRENT_PIP" ||
    echo "warning: pip could not be upgraded; the set-up goes on with $("$PY" -m pip --version)"
fi
