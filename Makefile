# The README's two commands: `make demo` and `make test`. Both create .venv when it
# is missing and install what they need, so a machine with only Python and pip works.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Test worker processes (pytest-xdist): one per core, at most 4 (each worker holds its
# own jax runtime and compiled programs; some tests start jax processes of their own).
# Much of a test's time is XLA compiling on one thread, so workers overlap it. Each
# test file runs in one worker (its module fixtures are built once).
# Files are handed out in the order tests/conftest.py collects them: slow ones first.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: demo test venv venv-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps reinstall only when the package metadata changes.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

demo: venv
	$(BIN)/vidsim demo

# pytest exits 5 when it collects nothing: for this suite that means something is
# broken (a bad -k, an import error at collection), so it fails like any other error.
# GLIBC_TUNABLES: what the vidsim command sets for itself (vidsim/malloc.py), for the
# in-process tests too.
test: venv-test
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; fi; \
	exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache
