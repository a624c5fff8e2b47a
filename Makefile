# dqrm-compress: set-up, demo, tests. `make demo` and `make test` are the two README commands.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint format bench clean

setup:  ## create .venv with the pinned CPU stack and this package (idempotent)
	bash setup/install.sh

demo: setup  ## build the demo model (first run only) and run the main job on it
	$(VENV)/bin/dqrm-compress demo

test: setup  ## lint, check formatting, then run the test suite (fails if no test ran)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup  ## every benchmark (several minutes; prints ratios against in-run baselines)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf demo benchmarks/.cache .pytest_cache .ruff_cache
