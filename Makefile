# Targets the README names. Everything runs from the project's own virtual environment.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; plain `torch` can pull a multi-GB CUDA build. Override: make TORCH=torch
TORCH ?= torch==2.13.0
DEMO := demo
LINTED := merger tests $(wildcard benchmarks)

.PHONY: setup demo test gpu lint format bench clean

setup: $(BIN)/merger

$(BIN)/merger: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# Build a family of tiny local models (base, fine-tunes, held-out text), merge them with TIES,
# then load the merge with transformers and run it; then a greedy soup chosen by held-out perplexity.
demo: setup
	test -f $(DEMO)/models/heldout.txt || $(BIN)/python -m merger.demo build $(DEMO)/models
	$(BIN)/merger plan recipes/demo-ties.yaml
	$(BIN)/merger apply recipes/demo-ties.yaml --force
	$(BIN)/python -m merger.demo check $(DEMO)/out/ties --heldout $(DEMO)/models/heldout.txt
	$(BIN)/merger apply recipes/demo-greedy-soup.yaml --force
	$(BIN)/python -m merger.demo check $(DEMO)/out/greedy-soup --heldout $(DEMO)/models/heldout.txt

test: setup
	$(BIN)/python -m pytest -q

# On a machine with an NVIDIA GPU (set up with a CUDA build of torch: make setup TORCH=torch), ~8 min (estimated):
# the CUDA tests, torch's CUDA sanitizer on a small merge, TinyLlama-shape TIES, DARE-TIES and DELLA merges on
# cuda and on cpu compared byte for byte, then the TinyLlama benchmark alternating cuda and cpu. Stops at the first failure
# (at once without CUDA); everything goes to gpu-report.txt too. See benchmarks/gpu_check.py --help.
gpu: setup
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make gpu: torch sees no CUDA device. On an NVIDIA machine, install a CUDA build of torch: rm -rf .venv && make setup TORCH=torch')"
	$(BIN)/python benchmarks/gpu_check.py --report gpu-report.txt

lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: setup
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

clean:
	rm -rf $(DEMO) .pytest_cache
