# Every target creates .venv on first use; nothing needs to be installed beforehand.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
SHARED  ?= ../shared/data
STAMP   := $(VENV)/.installed

.PHONY: setup run test data lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

data: setup
	$(BIN)/python scripts/prepare_data.py --shared $(SHARED) --dest data

# The README's main job: a real, quick CPU comparison on CIFAR-10 resnet20 of every strategy that serves it
# (forward_ad needs GELU/SiLU-type activations: see results/activation-memory-vit.md), then the table.
run: data
	$(BIN)/python scripts/sweep_table.py --strategies exact,checkpoint,actnn,division,blpa,fewbit experiment=quick_cpu

test: data
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check actmem scripts tests

clean:
	rm -rf $(VENV) outputs multirun
