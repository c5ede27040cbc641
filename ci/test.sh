#!/usr/bin/env bash
# The whole test suite, as CI runs it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
export PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
