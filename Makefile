# The two commands a user needs: `make demo` (train on the embedded default) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install lint test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# One formatter and linter for the whole tree (config in pyproject.toml); `make format` applies it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Two workers, whole files each (module fixtures are built once): most of the suite is compile-bound
# and single-threaded. Then the `serial` tests alone (multi-process runs, wall-clock bounds).
test: $(STAMP)
	$(PY) -m pytest -n $${PYTEST_WORKERS:-2} --dist loadfile -m "not serial" tests
	$(PY) -m pytest -m serial tests

# The embedded default: synthetic data + tiny model + warm-up + PGPO, on this machine's CPU.
demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) scripts/train.py --config=configs/demo.py --workdir=runs/demo

clean:
	rm -rf $(VENV) .pytest_cache
