# make test: everything CI checks. make run: the daemon in a throwaway systemd.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrapped

.PHONY: test lint unit integration run bench bootstrap clean deb

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

# The Debian package, built from a copy of the tree (debian/ from packaging/).
deb: $(STAMP)
	rm -rf build/deb
	mkdir -p build/deb/src dist
	tar --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./dist \
		--exclude=__pycache__ --exclude='*.egg-info' -cf - . | tar -C build/deb/src -xf -
	cp -r packaging/debian build/deb/src/debian
	# Debian's own Python builds it, whatever python3 comes first on PATH here.
	cd build/deb/src && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	mv build/deb/ares-deployd_*_all.deb dist/

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
