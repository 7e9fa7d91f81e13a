# make test: everything CI checks. make run: the daemon in a throwaway systemd.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrapped

.PHONY: test lint unit integration run bootstrap clean

test: lint
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP)
	$(PY) -m pytest tests/integration

run: $(STAMP)
	$(PY) examples/demo/run.py

bootstrap $(STAMP): pyproject.toml tools/bootstrap
	tools/bootstrap $(VENV)
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
