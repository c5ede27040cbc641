# gemu: every target sets up .venv itself (ci/setup.sh), so a fresh clone needs only `make X`.
.PHONY: setup demo test bench lint format soak clean

setup:
	@bash ci/setup.sh

demo: setup
	@.venv/bin/gemu demo

test: setup
	@bash ci/test.sh

bench: setup
	@.venv/bin/python tests/bench/run.py

lint: setup
	@bash ci/lint.sh

format: setup
	@.venv/bin/ruff format .
	@.venv/bin/ruff check --fix .

soak: setup
	@.venv/bin/python -m pytest -q -m soak tests

clean:
	rm -rf .venv out build *.egg-info .pytest_cache .ruff_cache .hypothesis
	rm -f guest/mm/_pagecopy.*.so
