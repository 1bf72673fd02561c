#!/usr/bin/env bash
# Run two commands at the same time: FIRST with its output live; SECOND beside it, its output kept and
# printed once FIRST is done, so the two never interleave. Exits with FIRST's status if it failed, else
# SECOND's. An interrupt or a TERM stops both, and what they started.
#   usage: side_by_side.sh FIRST SECOND   (each a shell command line)
#
# `make test` runs the main suite and the oldest-transformers run this way: the main suite leaves a core
# idle now and then (its workers' start, tests that wait on a lock or a browser, its last file), and the
# second run fills those gaps (docs/development.md gives the times).
set -uo pipefail
[ $# -eq 2 ] || { echo "usage: $0 FIRST SECOND" >&2; exit 2; }
log=$(mktemp)
set -m  # each in a process group of its own, so that stopping one stops everything it started
bash -c "$2" >"$log" 2>&1 </dev/null &
second=$!
bash -c "$1" &
first=$!
set +m
trap 'kill -- -"$first" -"$second" 2>/dev/null; rm -f "$log"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The script waits (a wait, unlike a command in the foreground, lets a trap run at once).
wait "$first"
first_status=$?
wait "$second"
second_status=$?
cat "$log"
exit $(( first_status != 0 ? first_status : second_status ))
