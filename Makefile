# Every target creates .venv on first use; nothing needs to be installed beforehand.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
SHARED  ?= ../shared/data
STAMP   := $(VENV)/.installed
GPU_WHEELS ?= .gpu/wheels
GPU_DATA   ?= .gpu/data

.PHONY: setup run test data lint clean gpu-bundle

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The tarballs in $(SHARED) unpacked into data/. Without them (a clone elsewhere: make data SHARED=<folder>)
# torchvision fetches CIFAR-10 into data/cifar10; with no network this fails with one paragraph on what to do.
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

# Wheels of what the lent GPU machine lacks (requirements-gpu.txt) for scripts/gpu_run.sh to install there
# offline, and the CIFAR-10 tarball for the suite's parity section (../shared does not travel; the section
# unpacks it into data/); carry `.gpu` with the working tree. Only pure-Python wheels: that machine's Python
# differs from ours.
gpu-bundle: setup
	rm -f $(GPU_WHEELS)/*.whl
	$(BIN)/pip wheel -q --no-deps -w $(GPU_WHEELS) -r requirements-gpu.txt
	@bad=$$(ls $(GPU_WHEELS) | grep -v -- '-py3-none-any\.whl$$' || true); \
	if [ -n "$$bad" ]; then echo "gpu-bundle: not pure-Python (py3-none-any) wheels: $$bad" >&2; exit 1; fi
	@want=$$(grep -c '^[^#]' requirements-gpu.txt); have=$$(ls $(GPU_WHEELS)/*.whl | wc -l); \
	if [ "$$want" != "$$have" ]; then echo "gpu-bundle: $$have wheels for $$want requirements" >&2; exit 1; fi
	@test -f $(SHARED)/cifar10-jpg.tar.gz || { echo "gpu-bundle: $(SHARED)/cifar10-jpg.tar.gz not found; the GPU \
	suite's parity section needs it (set SHARED=<folder with the tarball>)" >&2; exit 1; }
	install -D -m 644 $(SHARED)/cifar10-jpg.tar.gz $(GPU_DATA)/cifar10-jpg.tar.gz
	du -sh $(GPU_WHEELS) $(GPU_DATA)

clean:
	rm -rf $(VENV) outputs multirun
