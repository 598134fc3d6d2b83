# kdad: the commands users and CI type. Every target installs what it needs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdad-installed
# the exact versions the suite last passed with (make lock writes it); CONSTRAINTS= installs the
# newest releases that pyproject.toml's ranges admit instead
CONSTRAINTS ?= constraints.txt
LOCK_VENV ?= .venv-lock
# torch's and oneDNN's AVX2 kernels on an AVX-512 machine (no effect on an AVX2-only one)
AVX2_KERNELS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
LINT_PATHS := src tests experiments
PYTEST_ARGS ?=
# the suite runs on 2 pytest-xdist workers with one torch thread each: most of its time is
# Python imports in end-to-end subprocesses, which two workers overlap (10.4 -> 7.3 min on 2 cores)
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-fast test-portable lint format lock bench bench-metrics clean help

help:
	@echo "make demo   - install, then train + evaluate RD on the built-in demo set"
	@echo "make test   - install, then run the whole test suite (CPU, no network)"
	@echo "make test-portable - the numerics-sensitive tests again, under the AVX2 kernels"
	@echo "make lint   - ruff check + ruff format --check (CI runs it before the tests)"
	@echo "make format - ruff format + ruff check --fix"
	@echo "make lock   - re-resolve the newest allowed releases, run the suite, write constraints.txt"
	@echo "make bench  - kdad vs anomalib RD speed side by side (installs anomalib into its own venv)"
	@echo "make bench-metrics - time the metric suite on 1,700 maps of 256x256"

# (Re)create the virtualenv and install kdad (editable) with its test extras whenever
# pyproject.toml or the constraints change: the versions of constraints.txt, torch + torchvision
# among them (a matching pair, resolved together by make lock).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/kdad-train -m experiment=demo

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

# the tests marked `numerics` (learned-quality bounds, re-computed forward passes) under the
# other CPU kernel set: run it with make test before stopping on any change to models, methods,
# metrics or data
test-portable: install
	$(AVX2_KERNELS) OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -m numerics $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: install
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

# a fresh venv with the newest releases pyproject.toml admits; the lint and the suite must pass
# in it before its exact versions replace constraints.txt
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	$(LOCK_VENV)/bin/ruff check $(LINT_PATHS)
	OMP_NUM_THREADS=1 $(LOCK_VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) -q $(PYTEST_ARGS)
	{ echo "# Exact versions the lint and the test suite passed with; written by make lock on $$(date -u +%F)"; \
	  $(LOCK_VENV)/bin/python -c 'import platform; print("# Python", platform.python_version(), platform.system(), platform.machine())'; \
	  echo "# make install uses it as pip constraints; pyproject.toml keeps the ranges for pip install kdad"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

# BENCH_ARGS: options of experiments/bench/bench_*.py, e.g. BENCH_ARGS="--backbones resnet18"
BENCH_ARGS ?=
bench: install
	KDAD_PY=$(PY) PYTHON=$(PYTHON) experiments/bench/run.sh $(BENCH_ARGS)

bench-metrics: install
	$(PY) experiments/metrics_speed/bench.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) outputs .pytest_cache
