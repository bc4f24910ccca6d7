#!/usr/bin/env bash
# Installs the project with its test extras into ./.venv and runs the whole test suite
# (unit tests, then the slow end-to-end tests). Works on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[test]'
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$status"
