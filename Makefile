# jaxmoe: `make demo` and `make test` do all the set-up themselves on a fresh clone:
# a virtual environment in .venv, the package installed into it (editable, with the test
# extras; native code is built by setup.py during the install), then the job.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when the packaging changes; the stamp lives inside the venv.
VENV_STAMP := $(VENV)/.jaxmoe-installed
PACKAGING := pyproject.toml $(wildcard setup.py)
# two workers (pytest-xdist), a test file stays on one: ~15 min on the 2-core CI box instead of ~22
PYTEST_ARGS ?= -n 2 --dist loadfile

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all demo test venv clean distclean help
all: help

help:
	@echo "make demo   - set up .venv, write a synthetic DeepSeek-V3 checkpoint, generate, print TTFT and tok/s"
	@echo "make test   - set up .venv and run the whole test suite"
	@echo "make venv   - only set up .venv"
	@echo "make clean  - remove build outputs and caches (keeps .venv); distclean removes .venv too"

# Native CPU kernels (targets `native`, `sanitize`), when that part of the tree exists.
-include cpu_ext/cpu_ext.mk
HAVE_SANITIZE := $(shell grep -qs '^sanitize:' cpu_ext/cpu_ext.mk && echo yes)
ifeq ($(HAVE_SANITIZE),yes)
sanitize: $(VENV_STAMP)
endif

venv: $(VENV_STAMP)

# torch is pinned to 2.13.0 in pyproject (a CPU wheel); any other version pulls CUDA wheels.
$(VENV_STAMP): $(PACKAGING)
	@test -x $(PY) || (echo "$(PYTHON) -m venv $(VENV)" && $(PYTHON) -m venv $(VENV))
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

demo: $(VENV_STAMP)
	$(VENV)/bin/jaxmoe demo

test: $(VENV_STAMP) $(if $(HAVE_SANITIZE),sanitize)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .cache
