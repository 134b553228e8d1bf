# Two commands on a fresh machine: `make train` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch for this Makefile's venv only; pyproject.toml states a range, so a CUDA
# machine or image keeps the torch it has.
TORCH ?= torch==2.13.0
CONFIG ?= default
ARGS ?=
DATA_DIR ?= data/moby-dick-bpe16k
PYTEST_ARGS ?=

.PHONY: help install dev data train test bench gpu-check clean

help:
	@echo "make train   set up .venv, prepare the bundled corpus, train the small CPU default, print a sample"
	@echo "make test    set up .venv with the dev extras and run every test (starts its own SLURM, S3, Docker)"
	@echo "make bench   run the benchmarks in benchmarks/ and print their tables"
	@echo "make gpu-check  on a GPU machine, in < 8 min: versions, matmul peak, GPT-2 speed, fp16, kill -9 resume, DDP, FSDP, checkpoint stall (ARGS=--quick)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

$(DATA_DIR)/meta.json: $(VENV)/.installed gpt_train/assets/moby_dick.txt
	$(PY) -m gpt_train prepare --bundled --out $(DATA_DIR)

data: $(DATA_DIR)/meta.json

train: $(VENV)/.installed $(DATA_DIR)/meta.json
	$(PY) -m gpt_train train $(CONFIG) $(ARGS)

test: $(VENV)/.dev
	$(PY) -m pytest -rs $(PYTEST_ARGS)

bench: $(VENV)/.dev
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

gpu-check: $(VENV)/.installed
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs data .pytest_cache

# docker-build, docker-push, docker-run GPUS=4 (see docs/docker.md)
include docker/docker.mk
