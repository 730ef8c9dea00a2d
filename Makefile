# Two commands for a newcomer: `make run` (the MTA with the embedded demo
# configuration) and `make test` (the whole test suite).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: run test deps setup lint bench clean

$(BIN)/twistd: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	@touch $@

setup: $(BIN)/twistd

run: setup
	$(BIN)/twistd -n --pidfile= mta

# The system tools the tests talk to (swaks, Postfix's smtp-sink/smtp-source):
# installed when missing as root on Debian, else one line says what to install.
deps:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash tests/deps.sh

# smtp-sink and smtp-source are in /usr/sbin, not on a normal user's PATH.
test: deps setup
	$(BIN)/ruff check mta tests twisted bench
	PATH="$$PATH:/usr/sbin:/sbin" $(BIN)/python -m pytest -q -p no:randomly

lint: setup
	$(BIN)/ruff check mta tests twisted bench

bench: setup
	bash bench/run.sh

clean:
	rm -rf $(VENV) var
