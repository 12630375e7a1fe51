# imagenet-resnet: `make demo` (set up + the whole system on generated data), `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SRC ?=
DEST ?=
WORKERS ?= $(shell nproc)
VERIFY ?= counts
PYTEST_ARGS ?=
TEST_WORKERS ?= auto
CHECK_WEIGHTS ?= torchvision:resnet50.IMAGENET1K_V1

.PHONY: help venv demo lint test test-fast bench prepare-imagenet check-imagenet clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -e '.[dali,export,dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision, timm, wandb, nvidia.dali" 
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the package with DALI and test tools (reused when present)

demo: $(STAMP)  ## generate small ILSVRC2012 archives, prepare them, train ResNet-18 with torchrun, evaluate, plot
	bash launch/demo.sh $(ARGS)

lint: $(STAMP)  ## ruff with the rules in pyproject.toml (line length 120, unused names, import order)
	$(VENV)/bin/ruff check .

test: lint  ## lint, then the whole suite (unit + end-to-end with several processes) on every core
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=20 $(PYTEST_ARGS)

test-fast: lint  ## lint, then the unit tests only, on every core
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not e2e" $(PYTEST_ARGS)

bench: $(STAMP)  ## benchmarks: writes bench/results.json and a Markdown table (CPU parts when no GPU)
	$(PY) -m benchmarks.bench --out bench

prepare-imagenet: $(STAMP)  ## SRC=<folder with the ILSVRC2012 archives> DEST=<output>: extract, map val, file lists, verify
	PYTHON=$(PY) WORKERS=$(WORKERS) VERIFY=$(VERIFY) bash data_prep/prepare_imagenet.sh "$(SRC)" "$(DEST)"

check-imagenet: $(STAMP)  ## DEST=<prepared ImageNet>: torchvision's ResNet-50 V1 must score its published 76.13 on it
	$(PY) -m imagenet_resnet.evaluate --pretrained $(CHECK_WEIGHTS) --check data.root="$(DEST)" $(ARGS)

clean:  ## remove the venv and generated demo data (never touches your DEST)
	rm -rf $(VENV) runs/demo data/demo
