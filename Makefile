# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch by default; on a CUDA machine install your torch first and run with TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python (the [export] extra, in [test]) builds llama.cpp from its PyPI source: only the library, on every
# core (pip caches the built wheel, so later setups skip the build)
LLAMA_BUILD ?= CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF"

.PHONY: setup setup-test demo test test-fast clean

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[serve]'
	touch $@

# the test extras: ruff, TRL (loss oracle), the openai client, llama-cpp-python (minutes to build the first time),
# Playwright; and Debian's chromium for the dashboard's browser tests (apt, when it is missing and apt can install it)
$(VENV)/.installed-test: $(VENV)/.installed
	$(LLAMA_BUILD) $(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@[ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "note: could not install Debian's chromium; the browser tests will be skipped"
	touch $@

demo: setup
	$(VENV)/bin/tunelab demo

test: setup-test
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
