# The two front-door commands: `make demo` and `make test`. Each sets itself up on a fresh
# machine (virtualenv + install), so nothing else needs to happen first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install tools oip-peers protos bench lint clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./clients/python -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

tools:
	bash scripts/system_tools.sh
	bash scripts/k8s_tools.sh >/dev/null

# MLServer and tritonclient in virtualenvs of their own, cached outside the tree (the tests call
# the script too, so a bare pytest run gets them as well)
oip-peers:
	bash scripts/oip_peers.sh >/dev/null

demo: $(STAMP)
	$(BIN)/sidecar demo

test: $(STAMP) tools oip-peers
	$(BIN)/python -m pytest

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/pip install --quiet -e ./clients/python

bench: $(STAMP) tools
	$(BIN)/python bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests bench scripts

clean:
	rm -rf $(VENV) .pytest_cache
