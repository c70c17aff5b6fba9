# Two ways in: `make demo` and `make test`. Each creates .venv when it is missing and installs
# editcomp into it. torch: the pinned CPU build unless nvidia-smi finds a GPU; override with
#   make test TORCH_SPEC='torch==2.13.0'      or      make demo PYTHON=python3.12
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.4' || echo 'torch==2.13.0')
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test test-fast install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/editcomp run recipes/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
