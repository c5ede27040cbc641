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
# The C page copy (guest/mm/_pagecopy.c) needs a compiler and Python's headers to build.
if ! command -v cc >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing gcc with apt-get (for the C page copy)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null
fi
headers=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if [ ! -f "$headers/Python.h" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing python3-dev with apt-get (for the C page copy)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-dev >/dev/null
fi
stamp=.venv/.gemu-setup
# the C source is built by the install: a change to it reinstalls too
want=$(cat pyproject.toml guest/mm/_pagecopy.c | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/gemu ]; then
    exit 0
fi
echo "setup: creating .venv and installing gemu[dev]" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# the build's own warnings (setuptools marks ext-modules in pyproject.toml experimental) are
# shown only if the install fails
log=$(mktemp)
if ! .venv/bin/python -m pip install --quiet -e ".[dev]" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: pip install -e .[dev] failed" >&2
    exit 1
fi
rm -f "$log"
if ! .venv/bin/python -c 'import gemu.guest.mm._pagecopy' 2>/dev/null; then
    echo "setup: the C page copy did not build (no compiler or Python headers):" \
        "fragmented swap I/O copies in Python, about a quarter slower" >&2
fi
echo "$want" > "$stamp"
