# `make run` / `make test` work on a fresh machine: they create .venv with the pinned requirements, reinstalling
# only when a requirements file changed (the stamp file depends on them), then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
REQS   ?= requirements.txt
PRESET ?= quick
PYTEST_ARGS ?=

.PHONY: run test test-all lint clean-venv ui

$(STAMP): $(REQS) requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r $(REQS)
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m benchmark run --suite table2 --preset $(PRESET)

# Passive OpenMP waiting: with more runnable threads than cores (2-core CI, subprocess tests) busy-waiting
# threads slow oneDNN/BatchNorm kernels by up to 10x.
export OMP_WAIT_POLICY ?= PASSIVE

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db

clean-venv:
	rm -rf $(VENV)
