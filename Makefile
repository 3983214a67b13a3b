# Two commands set everything up on a fresh machine: `make test` and `make train`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision come from the package registry as a matching pair (open_clip needs torchvision).
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
# TORCH=cuda (default): the registry's wheels, which on Linux bring the CUDA libraries (several GB). TORCH=cpu:
# PyTorch's CPU-only wheels of the same versions (2.14.1+cpu, 0.29.1+cpu) from PyTorch's own index, no CUDA. Chosen
# when .venv is made: `make clean` first to switch.
TORCH ?= cuda
TORCH_INDEX_cuda :=
TORCH_INDEX_cpu := --index-url https://download.pytorch.org/whl/cpu
ifeq ($(filter $(TORCH),cuda cpu),)
$(error TORCH=$(TORCH): choose cuda (the default: the registry's wheels) or cpu (CPU-only wheels))
endif
# `make train` writes its run here; `python -m app --checkpoint runs/demo` serves it. A second `make train`
# continues it (a finished run is only re-evaluated); `rm -rf runs/demo` trains a new one.
DEMO_RUN := runs/demo

.PHONY: test train venv lint format base clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PAIR) $(TORCH_INDEX_$(TORCH))
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

# The suite runs on TEST_WORKERS processes (pytest-xdist), one test module at a time each, one thread each. Most
# tests are single-threaded Python: two workers on two cores took 8 min 38 s and 11 min 16 s where one process took
# 16 min 56 s (2026-12-02). One thread per worker keeps them from fighting over the cores, and the sums the same on
# every machine. tests/conftest.py starts the module that trains for minutes first.
TEST_WORKERS ?= 2

test: venv
	sh scripts/install_browser.sh
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

train: venv
	if [ -f $(DEMO_RUN)/config.json ]; then $(BIN)/python train.py --resume $(DEMO_RUN); \
	else $(BIN)/python train.py --recipe demo --run.out $(DEMO_RUN); fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

base: venv
	$(BIN)/python scripts/build_tiny_base.py
	$(BIN)/python scripts/build_tiny_base.py --demo

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
