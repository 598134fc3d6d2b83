# kdad: the commands users and CI type. Every target installs what it needs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdad-installed
LINT_PATHS := src tests experiments
PYTEST_ARGS ?=
# the suite runs on 2 pytest-xdist workers with one torch thread each: most of its time is
# Python imports in end-to-end subprocesses, which two workers overlap (10.4 -> 7.3 min on 2 cores)
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-fast lint format bench bench-metrics clean help

help:
	@echo "make demo   - install, then train + evaluate RD on the built-in demo set"
	@echo "make test   - install, then run the whole test suite (CPU, no network)"
	@echo "make lint   - ruff check + ruff format --check (CI runs it before the tests)"
	@echo "make format - ruff format + ruff check --fix"
	@echo "make bench  - kdad vs anomalib RD speed side by side (installs anomalib into its own venv)"
	@echo "make bench-metrics - time the metric suite on 1,700 maps of 256x256"

# (Re)create the virtualenv and install kdad (editable) with its test extras whenever
# pyproject.toml changes. pip resolves torch + torchvision together from the registry.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/kdad-train -m experiment=demo

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: install
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

# BENCH_ARGS: options of experiments/bench/bench_*.py, e.g. BENCH_ARGS="--backbones resnet18"
BENCH_ARGS ?=
bench: install
	KDAD_PY=$(PY) PYTHON=$(PYTHON) experiments/bench/run.sh $(BENCH_ARGS)

bench-metrics: install
	$(PY) experiments/metrics_speed/bench.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
