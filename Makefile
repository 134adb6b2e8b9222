# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch by default; on a CUDA machine install your torch first and run with TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/tunelab demo

test: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
