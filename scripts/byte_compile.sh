#!/usr/bin/env bash
# Byte-compile the modules under each FOLDER that NearID imports, on every core, where Python keeps no
# bytecode of its own.
#   usage: byte_compile.sh PYTHON FOLDER...
#
# The set-up installs with `pip install --no-compile`: pip would compile every file it installs (about
# 19,500, most never imported), one after the other. Python compiles a module when it is first imported
# and keeps the result in __pycache__, so only what runs is compiled, once. Where PYTHONDONTWRITEBYTECODE
# is set it keeps nothing, and every interpreter would compile torch again: there this compiles after the
# install, in the mode pip would, one process per core.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 PYTHON FOLDER..." >&2; exit 2; }  # compileall without a folder compiles sys.path
PY=$1
shift
[ -n "${PYTHONDONTWRITEBYTECODE:-}" ] || exit 0
# Left out: what NearID and its tests never import, 37% of the source in the venv (docs/development.md): the
# packages' own test folders, and transformers' model families other than the ones NearID loads (SigLIP,
# SigLIP 2, the CLIP and DINO baselines of nearid/scorers.py, and encoder_decoder, which transformers' auto
# classes import). A module left out still imports; Python compiles it in memory then. The paths are matched
# below the FOLDERs, so that a folder named tests above them leaves nothing out.
FOLDERS=$("$PY" -c 'import re, sys; print("|".join(re.escape(folder.rstrip("/")) for folder in sys.argv[1:]))' "$@")
NOT_IMPORTED="^(?:$FOLDERS)/(?:.+/)?tests?/|^(?:$FOLDERS)/transformers/models/(?!__init__|auto/|siglip2?/|clip/|dinov[23]|encoder_decoder/)"
# compileall writes bytecode though PYTHONDONTWRITEBYTECODE is set, in the mode pip writes it (checked by
# timestamp). Status 1 means some file did not compile (torch ships one in Python 3.12 syntax): pip skips
# such a file too, and it fails only if it is imported.
"$PY" -m compileall -qq -j0 -x "$NOT_IMPORTED" "$@" || [ $? -eq 1 ]
