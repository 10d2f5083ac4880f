# Quick start: `make demo` trains and evaluates a small network; `make test` runs the tests.
# Both create (or reuse) .venv and install woodfisher into it in editable mode.

PYTHON ?= python3
VENV ?= .venv
# Pin torch first: on a machine without a CUDA-aware index a loose spec can pull a multi-GB
# CUDA build. Override with e.g. `make test TORCH='torch>=2.2'`.
TORCH ?= torch==2.13.0
DATA_DIR ?= /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint data clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet '$(TORCH)'
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,all]'
	touch $(STAMP)

data:
	@if [ ! -d "$(DATA_DIR)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	     { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	       { apt-get update -qq >/dev/null 2>&1 && \
	         apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; }; then \
	    echo "installed dataset-fashion-mnist"; \
	  else \
	    echo "Fashion-MNIST not found at $(DATA_DIR); the demo falls back to sklearn digits."; \
	  fi; \
	fi

demo: $(STAMP) data
	$(VENV)/bin/woodfisher demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/python -m pytest -q

# The checks kept out of the default run (real SIGKILLs of CLI runs, bigger models); CI runs
# them after `make test` so that they cannot rot.
test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
