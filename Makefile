# Two commands for a newcomer: `make run` (the MTA with the embedded demo
# configuration) and `make test` (the whole test suite).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: run test setup lint bench clean

$(BIN)/twistd: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	@touch $@

setup: $(BIN)/twistd

run: setup
	$(BIN)/twistd -n --pidfile= mta

test: setup
	$(BIN)/ruff check mta tests twisted bench
	$(BIN)/python -m pytest -q -p no:randomly

lint: setup
	$(BIN)/ruff check mta tests twisted bench

bench: setup
	bash bench/run.sh

clean:
	rm -rf $(VENV) var
