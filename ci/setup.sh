#!/usr/bin/env bash
# Create .venv and install gemu with its development tools. Idempotent: a stamp file records
# the pyproject.toml it was made from, so a changed dependency list reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive: gdb-multiarch (the debugger users attach to the device
# model) and chromium (renders explore's race.html headless).
missing=()
command -v gdb-multiarch >/dev/null 2>&1 || missing+=(gdb-multiarch)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${missing[*]} with apt-get" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: ${missing[*]} missing; install with apt-get install ${missing[*]} as root" >&2
        exit 1
    fi
fi
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
