# kvlab: set up, build the book, run the tests.
#
#   make book    set up .venv (if needed) and build the book into _build/html
#   make test    set up .venv (if needed) and run the unit tests and every notebook
#
# Other targets: setup, test-unit, test-notebooks, strip, clean, distclean, help.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
JB     := $(VENV)/bin/jupyter-book

# torch goes in first and on its own, with an exact version. Left to resolve `torch>=2.1`
# from requirements.txt on a machine without torch, pip would download the newest CUDA
# build (several GB). Examples:
#   make setup TORCH_SPEC=torch==2.5.1
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   (CPU-only Linux)
TORCH_SPEC      ?= torch==2.13.0
TORCH_INDEX_URL ?=
TORCH_PIP_ARGS  := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

# pytest-xdist workers. Notebooks are distributed a whole file per worker (--dist loadfile):
# plain `-n 2` scatters one notebook's cells over workers and breaks its kernel state.
# TEST_JOBS=0 runs everything in one process. With parallel workers each one gets a single
# math thread (OMP_NUM_THREADS=1): two workers with two threads each on a 2-core machine make
# small tensor operations spin-wait on each other, and run tens of times slower.
TEST_JOBS ?= 2
THREADS := $(if $(filter-out 0,$(TEST_JOBS)),OMP_NUM_THREADS=1)
# Seconds one notebook cell may run under nbval; keep equal to execute.timeout in _config.yml.
CELL_TIMEOUT ?= 300
# Narrowing or extending a run: UNIT_ARGS="-k cache", NB_PATHS=notebooks/04_kv_cache.ipynb,
# NB_ARGS="--junitxml=nb.xml".
UNIT_ARGS ?=
NB_PATHS  ?= notebooks
NB_ARGS   ?=

# A local Tiny Shakespeare beside the repository (as on the course's CI machines) saves a
# download; kvlab reads KVLAB_SHAKESPEARE. An explicit setting in the environment wins.
SHAKESPEARE_LOCAL := $(wildcard $(CURDIR)/../shared/data/tinyshakespeare/input.txt)
ifneq ($(SHAKESPEARE_LOCAL),)
export KVLAB_SHAKESPEARE ?= $(abspath $(SHAKESPEARE_LOCAL))
endif

# The stamp records a finished install. It is older than any requirement file that changed
# since, which makes `make setup` install again; otherwise setup does nothing.
STAMP := $(VENV)/.kvlab-setup-stamp

.PHONY: help setup book test test-unit test-notebooks strip clean distclean

help:
	@echo "make book       set up .venv and build the book into _build/html"
	@echo "make test       set up .venv and run the unit tests and every notebook"
	@echo "make setup      only create/update .venv ($(TORCH_SPEC) first, then the requirements)"
	@echo "make test-unit | test-notebooks   one half of 'make test' (no setup)"
	@echo "make strip      remove outputs and execution counts from notebooks/*.ipynb"
	@echo "make clean      remove _build and test caches;  make distclean  also removes .venv"

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml | $(PY)
	$(PIP) install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PIP) install -r requirements.txt -r requirements-dev.txt
	$(PIP) install -e .
	@# Jupyter Book 2 would ignore _config.yml and exit 0: refuse to continue with it.
	@$(PY) -c 'import importlib.metadata as m, sys; v = m.version("jupyter-book"); \
	  sys.exit(0 if v.split(".")[0] == "1" else f"jupyter-book {v} installed, this book needs 1.x")'
	@touch $@

# --all: a full rebuild every time, so a warning in an unchanged page is reported again
# instead of being hidden by Sphinx's incremental build. Notebooks are executed on every
# build anyway (execute_notebooks: force in _config.yml).
# -W -n --keep-going: every warning and missing reference is reported, then the build
# exits non-zero.
book: setup
	$(JB) build . --all -W -n --keep-going
	@echo "Book: $(CURDIR)/_build/html/index.html"

# Both halves always run, so one failure does not hide the other; the target fails if
# either does. A half with nothing to collect (no tests/test_*.py, or no notebooks yet) is
# skipped with a message; if files exist and pytest still collects nothing (exit code 5),
# that is a failure.
test: setup
	@status=0; \
	$(MAKE) --no-print-directory test-unit || status=1; \
	$(MAKE) --no-print-directory test-notebooks || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED (see above)"; fi; \
	exit $$status

# MPLBACKEND=Agg is for the unit tests only. A Jupyter kernel started with MPLBACKEND set
# keeps it instead of switching to the inline backend, and its figures would vanish.
test-unit:
	@if ! compgen -G 'tests/test_*.py' > /dev/null; then \
	  echo "test-unit: no tests/test_*.py yet, skipped"; exit 0; fi; \
	set -x; $(THREADS) MPLBACKEND=Agg $(PY) -m pytest tests $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS)) $(UNIT_ARGS)

test-notebooks:
	@if ! compgen -G 'notebooks/*.ipynb' > /dev/null; then \
	  echo "test-notebooks: no notebooks/*.ipynb yet, skipped"; exit 0; fi; \
	set -x; $(THREADS) $(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) \
	  $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile) \
	  $(NB_ARGS) $(NB_PATHS)

# Notebooks are committed without outputs: the book and the tests execute them anyway
# (_config.yml), and outputs make diffs unreadable.
define STRIP_PY
import sys, nbformat
for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    print("stripped", path)
endef

strip: export STRIP_PY_SRC := $(STRIP_PY)
strip: setup
	$(PY) -c "$$STRIP_PY_SRC" notebooks/*.ipynb

clean:
	rm -rf _build .pytest_cache tests/.pytest_cache notebooks/.pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
