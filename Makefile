# covidct: make help lists every target (install | test | test-fast | lint | train | bench | clean, ...)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pair known to import together here (CPU or CUDA machines alike)
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
export WANDB_MODE ?= offline

.PHONY: help install test test-fast lint train predict-demo two-stage-demo bench bench-predict bench-gpu bench-growth clean

help:  ## this list: every target and what it does
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

install:  ## fresh venv with everything (torch first, then the project and its dev tools)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PKGS)
	$(BIN)/pip install --quiet -e '.[dev]'

# tests run in TEST_WORKERS processes (pytest-xdist); the whole suite keeps a file's tests in one worker, in
# order (its module fixtures, e.g. exported models, are built once), the unit tests are spread one by one
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test:  ## the whole suite, slow end-to-end tests included (what CI runs)
	$(PYTEST) --dist loadfile --durations=30

test-fast:  ## unit tests only
	$(PYTEST) --dist load -m "not slow"

lint:  ## ruff's lint rules and its formatting (ruff format . fixes the latter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

train:  ## the default CPU demo on the embedded synthetic data
	$(BIN)/python train.py

predict-demo:  ## predict.py on the validation patients of the newest finished `make train` run (best checkpoint), scored
	args=$$($(BIN)/python -m covidct.training.validation_set outputs/train/runs) && $(BIN)/python predict.py $$args progress=false

two-stage-demo:  ## paper label mode vs two-stage pseudo-labels on the same synthetic patients (~15 min on 2 cores)
	PY=$(BIN)/python tools/two_stage_demo.sh $(ARGS)

SAMPLE ?= ../shared/data/covid-ct-md-sample
bench-predict:  ## seconds per 150-slice patient and overhead over a bare forward (VGG16, 224 px)
	$(BIN)/python -m covidct.bench.predict input=$(SAMPLE) backbone=vgg16 image_size=224 $(ARGS)
bench-gpu:  ## on a CUDA machine: VGG16 bf16 training img/s (cache vs GPU tensors, compile), predict.py GPU vs forward
	$(BIN)/python -m covidct.bench.predict input=$(SAMPLE) backbone=vgg16 image_size=224 'rows=[gpu]' $(ARGS)

clean:  ## run outputs and caches (generated data too); keeps the venv
	rm -rf outputs multirun .cache .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -exec rm -rf {} +

bench:  ## where the time goes: loader, cache build, framework, precision, memory, inference ratios (bench.json)
	$(BIN)/python -m covidct.bench $(ARGS)
bench-growth:  ## every stage at 1x, 2x, 4x the patients: s/patient 4x vs 1x (<= 1.15x), peak RSS (bench.json)
	$(BIN)/python -m covidct.bench 'bench.rows=[growth]' $(ARGS)
