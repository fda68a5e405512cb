# Two entry points for a fresh machine: `make run` (the nightly pipeline) and `make test`.
# Both create .venv when it is missing and reuse it otherwise.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(PY))

.PHONY: install run test test-slow test-cluster bench clean browser postgres

$(STAMP): requirements.lock setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# torch first: this pin takes the CPU wheel; a loose torch requirement pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# the lock is complete, so no resolver run: this also keeps pyspark-client (a Spark
	# Connect-only package the Spark provider asks for) from shadowing the full pyspark
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) infra/run_nightly.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP) browser
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# the browser tests drive Debian's Chromium with the playwright package of the lock (never
# `playwright install`, which downloads a browser build of its own)
browser: $(STAMP)
	test -x /usr/bin/chromium || { $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium; }

# servers started by the tests themselves on 127.0.0.1 (infra/start_{spark_cluster,postgres,mlflow,airflow}.sh)
test-cluster: $(STAMP) postgres
	$(PY) -m pytest -q -m cluster $(PYTEST_ARGS)

# Debian's PostgreSQL server binaries, for infra/start_postgres.sh
postgres:
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y postgresql; }

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/quantiser.py
	$(PY) bench/decode.py
	$(PY) bench/precision.py
	$(PY) bench/train_memory.py

clean:
	rm -rf .gensar
