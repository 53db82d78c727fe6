# Two entry points, each installing what it needs into .venv first:
#   make run    # the default workflow, end to end (snakemake --cores all)
#   make test   # the test suite (pytest)
#   make serve  # the finished runs of a base model behind an OpenAI-style API (BASE=tiny-llama PORT=8000)
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

BASE ?= tiny-llama
PORT ?= 8000

.PHONY: install run test lint clean serve

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

# Trains what the base model's runs still need, then serves them (Ctrl-C stops it).
serve: install
	snakemake --cores all results/serve/$(BASE).json
	python scripts/serve.py --manifest results/serve/$(BASE).json --port $(PORT)

lint: install
	snakemake --lint
	snakefmt --check Snakefile rules

clean:
	rm -rf results .snakemake
