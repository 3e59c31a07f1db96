# Two commands on a fresh machine:
#   make demo       # install into .venv, then run the embedded demo end to end
#   make test       # install into .venv, then run the test suite (what CI runs)
#   make test-fast  # everyday tier: no Ray, nothing marked slow (pytest markers `ray`, `slow`)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch with a torchvision that imports beside it (open_clip needs both)
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
# the releases the project was tested with (scripts/lock_constraints.py); the cluster nodes install the same
CONSTRAINTS := configs/cluster/constraints.txt
PYTEST_ARGS ?=
# test processes (pytest-xdist); each test file runs whole in one of them (module-wide fixtures built once)
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast test-all config-docs bench clean lock

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) $(TORCH_PKGS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/laionbuild demo --output demo-output

test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -m "not gpu" -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -m "not ray and not slow and not gpu" -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# docs/config.md from the config dataclasses (tests/test_config_docs.py checks it is in sync)
config-docs: $(STAMP)
	$(BIN)/python -m laionbuild.config_docs --write

# GPU tests too (on a machine with CUDA)
test-all: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# after a change of the environment (an upgrade, a new package): pin it again
lock: $(STAMP)
	$(BIN)/python scripts/lock_constraints.py

clean:
	rm -rf demo-output demo-output-sample .pytest_cache build *.egg-info
