#!/usr/bin/env bash
# Create .venv (or $VENV) and install the project with its test and export extras.
# torch/torchvision are pinned first: pip takes them from a local wheel cache where one exists,
# and the rest of the project's dependencies then resolve against them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.cfg ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[test,export]"
touch "$STAMP"
echo "environment ready: $VENV"
