#!/usr/bin/env bash
# `make test`'s two phases, side by side: the multi-process swarm tests (marked slow) in the foreground one at a time,
# as each of them uses both cores now and then, and the in-process tests beside them at the lowest CPU priority, in
# one process, on what the swarms leave idle (they keep about 45 % of 2 cores busy: they wait on matchmaking, rounds
# and timeouts). Exits non-zero if either phase failed; the in-process phase's output follows the slow phase's.
#
#   scripts/run_tests.sh [PYTEST ARGS...]   (extra arguments go to both phases; BIN: the virtualenv's bin folder)
set -uo pipefail
BIN=${BIN:-.venv/bin}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

nice -n 19 "$BIN/python" -m pytest -q --durations=15 -m "not slow" -p no:cacheprovider --basetemp="$work/in-process" \
  "$@" > "$work/in-process.log" 2>&1 &
in_process=$!
"$BIN/python" -m pytest -q --durations=15 -m slow "$@"
slow=$?
wait "$in_process"
fast=$?
echo "---------------- the in-process tests (run beside the slow ones, niced) ----------------"
cat "$work/in-process.log"
echo "slow phase: exit $slow; in-process phase: exit $fast"
[ "$slow" -eq 0 ] && [ "$fast" -eq 0 ]
