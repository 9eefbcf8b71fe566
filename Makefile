# The two commands: `make test` and `make demo`. Both build their own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

OLDEST_VENV ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed-test
# The oldest versions we support, tested beside the newest ones: the floor of every runtime
# dependency in pyproject.toml (keep them in step).
OLDEST_PINS := 'Django==4.2' 'celery==5.4.0' 'kombu==5.7.0' 'redis==6.1.0' 'requests==2.31.0' \
	'django-celery-results==2.5.0' 'tqdm==4.60.0'

.PHONY: test test-oldest lint venv clean demo demo-serve bench tahoe soak

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff with the rules in pyproject.toml ([tool.ruff]), then mypy over the typed public API
# (the files of [tool.mypy]); fails on any violation or type error. .ci/run calls it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

$(OLDEST_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet -e '.[test]' $(OLDEST_PINS)
	touch $@

# The suite on the oldest releases we declare (Django 4.2.0, Celery 5.4.0...).
# The soak test (95 s) runs once, in `make test`.
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest -m "not soak" $(PYTEST_ARGS)

# The whole system on embedded defaults (SQLite, embedded Redis, two MediaServers, a worker).
demo: $(STAMP)
	$(PY) example/demo.py

# The same, then the example site on http://127.0.0.1:8000/ (DEMO_PORT) to try uploads, the
# dashboard and a media host going down and coming back (/demo/hosts/); the worker runs beat,
# so reconcile heals what the retries gave up on. Ctrl-C stops everything it started.
DEMO_PORT ?= 8000
demo-serve: $(STAMP)
	$(PY) example/demo.py --serve --port $(DEMO_PORT)

# tahoe-lafs for the Tahoe host tests, in a virtualenv of its own (its pins are not ours);
# resto_celery.testing.tahoe.find_tahoe() finds .venv-tahoe/bin/tahoe. .ci/run calls this.
TAHOE_VENV ?= .venv-tahoe
TAHOE_STAMP := $(TAHOE_VENV)/.installed

tahoe: $(TAHOE_STAMP)

$(TAHOE_STAMP):
	$(PYTHON) -m venv $(TAHOE_VENV)
	$(TAHOE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TAHOE_VENV)/bin/python -m pip install --quiet 'tahoe-lafs==1.20.0'
	touch $@

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(TAHOE_VENV) .pytest_cache .mypy_cache .cache build *.egg-info example/var

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# Benchmarks: benchmarks/README.md. BENCH_ARGS=--quick for a smoke run.
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The soak test at full length (tests/soak.py; CI runs it for 90 s within `make test`): app
# processes change files for SOAK_SECONDS while a host flaps, a worker is killed and the broker
# restarts; writes benchmarks/results/soak.json and soak.png (lag, queue length, worker RSS).
SOAK_SECONDS ?= 900
soak: $(BENCH_STAMP)
	RESTO_SOAK_SECONDS=$(SOAK_SECONDS) RESTO_SOAK_OUTPUT=benchmarks/results \
		$(PY) -m pytest -m soak -p no:cacheprovider tests/test_soak.py $(PYTEST_ARGS)
