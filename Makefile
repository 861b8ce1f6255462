# Everything runs inside .venv at the repository root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run run-kafka test test-fast lint typecheck bench clean services

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Run the orders example on the embedded default (in-memory clusters).
run: $(STAMP)
	$(BIN)/duct-messaging run examples/orders/config.yaml

## Run the orders example on two real Kafka-compatible brokers.
run-kafka: $(STAMP)
	$(BIN)/python -m duct_messaging.testing.tansu run -n 2 -- \
	    $(BIN)/duct-messaging run examples/orders/config.kafka.yaml

## Start what the tests need, then run the whole suite.
test: $(STAMP)
	bash scripts/services.sh
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check duct_messaging tests bench examples
	$(BIN)/ruff format --check duct_messaging tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

## Every benchmark; each prints our rate next to the raw client's.
bench: $(STAMP)
	bash scripts/services.sh
	$(BIN)/python bench/kafka_produce_consume.py
	$(BIN)/python bench/transports.py
	$(BIN)/python bench/schemas.py
	$(BIN)/python bench/system_lifecycle.py
	$(BIN)/python bench/deferred.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
