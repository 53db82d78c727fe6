# Two entry points, each installing what it needs into .venv first:
#   make run    # the default workflow, end to end (snakemake --cores all)
#   make test   # the test suite (pytest)
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test lint clean

install: $(VENV)/.installed

# The workflow's package (finetune/) is installed in editable mode: the stage scripts,
# tests and benchmarks import it, and an edit to it is live at once.
$(VENV)/.installed: requirements.txt requirements-test.txt constraints-cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-test.txt -c constraints-cpu.txt -e .
	touch $@

run: install
	snakemake --cores all

test: install
	pytest

lint: install
	snakemake --lint
	snakefmt --check Snakefile rules

clean:
	rm -rf results .snakemake
