# One entry point. `make serve` and `make test` are the README's two commands.
# The interpreter for the virtual environment: the first of python3.11, python3.12, python3 that is
# Python 3.11 or newer (`make python` says which; `make PYTHON=/path/to/python setup` chooses).
ifeq ($(origin PYTHON), undefined)
PYTHON := $(shell for candidate in python3.11 python3.12 python3; do \
	if command -v $$candidate >/dev/null 2>&1 && \
	   $$candidate -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then \
	  echo $$candidate; break; fi; done)
endif
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup serve test test-fast python clean

python:
	@if [ -z "$(PYTHON)" ]; then \
	  echo "error: no Python 3.11 or newer found (tried python3.11, python3.12, python3); set PYTHON=..." >&2; exit 2; fi
	@echo "$(PYTHON) ($$($(PYTHON) --version 2>&1))"

# Idempotent: reinstalls only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  $(MAKE) --no-print-directory -s python >/dev/null || exit 2; \
	  echo "creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version 2>&1))"; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	bash scripts/serve.sh

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
