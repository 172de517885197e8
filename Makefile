# The two commands: `make run` (set up, run the main job, write the report) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.citylib-installed

.PHONY: run test report clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	# pynndescent (which openTSNE imports to look for it) compiles its numba functions on its
	# first import, about 25 s, and caches them in the environment: once here, not in the job.
	$(BIN)/python -c "import pynndescent"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/citylib run
	$(BIN)/citylib report

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(BIN)/python tests/nbval_smoke.py

report: $(STAMP)
	$(BIN)/citylib report

clean-venv:
	rm -rf $(VENV)
