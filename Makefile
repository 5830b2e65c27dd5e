# The two front-door commands: `make demo` and `make test`. Each sets itself up on a fresh
# machine (virtualenv + install), so nothing else needs to happen first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install protos bench lint clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./clients/python -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sidecar demo

test: $(STAMP)
	$(BIN)/python -m pytest

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/pip install --quiet -e ./clients/python

bench: $(STAMP)
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client) \
		|| echo "no h2load: bench/ falls back to its Python load generator"
	$(BIN)/python bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests bench scripts

clean:
	rm -rf $(VENV) .pytest_cache
