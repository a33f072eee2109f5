# lmforge: `make chat` to talk to the default model, `make test` to run the suite. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines take the local CPU build of torch; a GPU machine can pass TORCH="torch" (or its own pin).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
MODEL ?= qwen2.5-coder-0.5b-instruct

.PHONY: setup chat test lint bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

# --quant auto: also the quantized copy chat and serve run by default (int8 on a CPU), so the first chat starts at once
setup: $(VENV)/.base
	$(VENV)/bin/lmforge pull $(MODEL) --quant auto

chat: setup
	$(VENV)/bin/lmforge chat --model $(MODEL)

test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/python -m pytest -q

$(VENV)/.bench: $(VENV)/.test
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	touch $@

bench: $(VENV)/.bench
	$(VENV)/bin/python bench/decode.py --model smollm2-135m-instruct
	$(VENV)/bin/python bench/decode.py --model $(MODEL)

clean:
	rm -rf $(VENV) build *.egg-info
