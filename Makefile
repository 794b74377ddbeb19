# VRAM Lab: two commands.
#   make lab   - create .venv if needed, install the course, start JupyterLab on chapter 00
#   make test  - create .venv if needed, install, lint (ruff), run unit tests + notebook hygiene + nbval
#   make book  - the course website in build/site, with the outputs of the last `make test` (book/build_site.py)
#   make test-site - build the site and check it, and `make lab`, in headless Chromium (tests_site/)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/ci-constraints.txt
STAMP := $(VENV)/.installed
NOTEBOOKS = $(wildcard chapters/*.ipynb labs/*.ipynb solutions/*.ipynb)
PORT ?= 8888
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)  # JupyterLab refuses root (containers) without it

.PHONY: lab test install labs strip clean bench dist book test-site serve-book gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test,lab,optim,compress,gpu,site,checkpoints]"
	touch $(STAMP)

install: $(STAMP)

lab: $(STAMP)
	@echo "Starting JupyterLab on chapters/00_start_here.ipynb; open the URL it prints (Ctrl-C to stop)."
	$(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) $(ROOT_FLAG) --ServerApp.root_dir=$(CURDIR) \
		--LabApp.default_url=/lab/tree/chapters/00_start_here.ipynb  # the printed URL opens chapter 00

WHEEL := $(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w
LINTED := utils tests tests_site book bench conftest.py

test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/python -m vramlab.labs --check
	$(BIN)/python -m pytest tests -q --nbval-lax --nbval-cell-timeout=120 \
		--current-env -p no:cacheprovider $(NOTEBOOKS)

BOOK_FLAGS ?=  # --reuse-only: fail rather than execute a notebook the test run did not (CI)

book: $(STAMP)  # the site, with the calculator's runtime (npm's pyodide) and this vramlab's wheel
	rm -rf build/wheel
	$(BIN)/python -m pip install -q "setuptools>=68"
	$(WHEEL) build/wheel .
	$(BIN)/python book/build_site.py $(BOOK_FLAGS)

test-site: book
	$(BIN)/python -m pytest tests_site -q -p no:cacheprovider

serve-book:  # the built site on http://127.0.0.1:$(PORT)/ (make book first)
	$(BIN)/python -m http.server --bind 127.0.0.1 --directory build/site $(PORT)

labs: $(STAMP)
	$(BIN)/python -m vramlab.labs

strip: $(STAMP)
	$(BIN)/python -m vramlab.notebooks strip chapters labs solutions

dist: $(STAMP)  # a wheel an instructor can upload to Colab beside the notebooks (see README, On Colab)
	rm -rf dist build
	$(BIN)/python -m pip install -q "setuptools>=68"
	$(WHEEL) dist .
	@ls dist/*.whl

bench: $(STAMP)
	$(BIN)/python bench/estimate_accuracy.py --write
	$(BIN)/python bench/sharded_dryrun.py --write
	$(BIN)/python bench/vllm/validate.py --write

clean:
	rm -rf $(VENV) .pytest_cache dist build

# On a GPU machine, with its own torch (nothing is installed; no network): validate every notebook
# cell by cell and record it in docs/gpu-runs/ (see docs/gpu-runs/README.md). GPU_CHECK_FLAGS: --emulate t4, --only 02 05
gpu-check:
	PYTHONPATH=utils $(PYTHON) -m vramlab.gpu_check $(GPU_CHECK_FLAGS)
