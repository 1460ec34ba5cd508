# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv with the pinned
# dependencies (requirements.lock) and the project in editable mode if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
WEIGHTS ?=
# Each pytest worker keeps its compiled programs here, so a re-run skips XLA compilation.
export JAX_COMPILATION_CACHE_DIR ?= $(or $(TMPDIR),/tmp)/ifadit-jax-jit-cache

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ifadit_jax.demo $(if $(WEIGHTS),--weights $(WEIGHTS))

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q --durations=15 tests

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
