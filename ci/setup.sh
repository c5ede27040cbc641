#!/usr/bin/env bash
# Create .venv and install gemu with its development tools. Idempotent: a stamp file records
# the pyproject.toml it was made from, so a changed dependency list reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.gemu-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/gemu ]; then
    exit 0
fi
echo "setup: creating .venv and installing gemu[dev]" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
