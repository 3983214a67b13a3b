# Two commands set everything up on a fresh machine: `make test` and `make train`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision come from the package registry as a matching pair (open_clip needs torchvision).
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: test train venv lint format base clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PAIR)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

test: venv
	sh scripts/install_browser.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

train: venv
	$(BIN)/python train.py --recipe demo

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
