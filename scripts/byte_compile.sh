#!/usr/bin/env bash
# Byte-compile the modules under each FOLDER that NearID imports, on every core, where Python keeps no
# bytecode of its own.
#   usage: byte_compile.sh [--beside PID] PYTHON FOLDER...
#
# With --beside, it compiles while the install PID runs, on the core that pip, which installs one file
# at a time, leaves idle: each package that the install adds, as soon as pip has finished it (pip writes
# a package's RECORD last), in one process. It returns once PID has ended (or when stopped); the caller
# then runs it without --beside, which compiles the rest on every core and skips what is compiled already.
#
# The set-up installs with `pip install --no-compile`: pip would compile every file it installs (about
# 19,500, most never imported), one after the other. Python compiles a module when it is first imported
# and keeps the result in __pycache__, so only what runs is compiled, once. Where PYTHONDONTWRITEBYTECODE
# is set it keeps nothing, and every interpreter would compile torch again: there this compiles after the
# install, in the mode pip would, one process per core.
set -euo pipefail
INSTALL=
[ "${1:-}" != --beside ] || { INSTALL=$2; shift 2; }
[ $# -ge 2 ] || { echo "usage: $0 [--beside PID] PYTHON FOLDER..." >&2; exit 2; }  # compileall without a folder compiles sys.path
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
if [ -z "$INSTALL" ]; then
  "$PY" -m compileall -qq -j0 -x "$NOT_IMPORTED" "$@" || [ $? -eq 1 ]
  exit 0
fi
records() {  # the RECORD of each package under the FOLDERs, one a line
  local folder record
  for folder in "$@"; do
    for record in "$folder"/*.dist-info/RECORD; do [ ! -f "$record" ] || echo "$record"; done
  done
}
# The RECORDs whose package is compiled (or left to the pass after the install), one a line. A package there
# before the install may be one pip replaces while it is read: the pass after the install compiles those.
COMPILED=$'\n'$(records "$@")$'\n'
while kill -0 "$INSTALL" 2>/dev/null; do
  while IFS= read -r record; do
    [[ $COMPILED != *$'\n'"$record"$'\n'* ]] || continue
    COMPILED+="$record"$'\n'
    # A RECORD line is PATH,HASH,SIZE, PATH relative to the folder that holds the .dist-info. Failures are the
    # later pass's to tell.
    sed -n "s|^\([^,]*\.py\),.*|${record%/*/RECORD}/\1|p" "$record" |
      xargs -d '\n' -r "$PY" -m compileall -qq -x "$NOT_IMPORTED" || true
  done < <(records "$@")
  sleep 1
done
