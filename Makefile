# `make demo` and `make test` bootstrap .venv themselves on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-py313 lint typecheck bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[server,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/fleetpki demo

# Two pytest workers (pytest-xdist), each test file whole on one worker so that its module
# fixtures (a RabbitMQ cluster, a browser, a PostgreSQL cluster per worker) start once: most
# of the suite waits on real servers and subprocesses, so two workers overlap those waits.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python $(PYTEST)

# The suite's CPython-sensitive part again on Python 3.13 (PY313=path), in its own venv: the
# TLS fast paths lean on CPython internals (enroll_server/transport/tls_socket.py,
# enroll_server/broker/hardening/), so a change of CPython must show up here, not at a
# customer. Not the whole suite: twice the whole suite would not fit CI's 15 minutes. The unit
# tests (every parser and pure rule) and the integration tests of the TLS transports, the EST
# front end and the connection limits run; ruff and mypy run once, under `make test`.
PY313 ?= python3.13
VENV313 := .venv-py313
PY313_TESTS := tests/unit tests/integration/test_tls_socket.py \
	tests/integration/test_est_front.py tests/integration/test_broker_hardening.py \
	tests/integration/test_broker_tls_fallback.py tests/integration/test_connection_limits.py \
	tests/integration/test_tls_policy.py
$(VENV313)/.installed: pyproject.toml
	test -x $(VENV313)/bin/python || $(PY313) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install -q --upgrade pip
	$(VENV313)/bin/python -m pip install -q -e '.[server,dev]'
	touch $(VENV313)/.installed

test-py313: $(VENV313)/.installed
	$(VENV313)/bin/python $(PYTEST) $(PY313_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/enroll.py

clean:
	rm -rf $(VENV) $(VENV313) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
