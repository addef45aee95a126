#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole suite (slow tests included).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh || exit 1
. "${VENV:-.venv}/bin/activate"
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
