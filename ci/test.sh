#!/usr/bin/env bash
# The whole test suite, as CI runs it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
export PYTHONHASHSEED=0
# Long soak/exploration campaigns are deselected by pyproject's addopts (-m 'not soak'; make
# soak runs them with -m soak); their short variants are ordinary tests.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
