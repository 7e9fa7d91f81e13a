# make test: everything CI checks. make run: the daemon in a throwaway systemd.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrapped

.PHONY: test lint unit integration run bench bootstrap clean

test: lint
	$(PY) -m pytest tests
	$(PY) bench/run.py --quick --out $(VENV)/bench-quick.md

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP)
	$(PY) -m pytest tests/integration

run: $(STAMP)
	$(PY) examples/demo/run.py

# wrk gives the load figures a client that costs less than the server it loads.
bench: $(STAMP)
	command -v wrk >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	$(PY) bench/run.py

bootstrap $(STAMP): pyproject.toml tools/bootstrap
	tools/bootstrap $(VENV)
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
