# Muster's everyday commands. `make help` lists them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STORAGE ?= $(CURDIR)/var/host-storage
# `make run PORT=8443`: the API and Cloud UI port (default 12443, or the one installed, which a
# later PORT=N changes). `HOST_IP=...`: the address other hosts reach this one at (default: the
# default route's; 127.0.0.1 keeps the platform to this machine).
PORT ?=
HOST_IP ?=

.PHONY: help install run test check bench demo fuzz clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with Muster and its dev dependencies

run: $(STAMP) ## install the first host under var/ (once) and serve it on port 12443 (PORT=N)
	@if [ -f $(STORAGE)/bootstrap-state/bootstrap-secrets.json ]; then \
		echo "Muster is already installed in $(STORAGE); starting it (rm -r $(STORAGE) to start over)."; \
		$(BIN)/muster start --host-storage-path $(STORAGE) $(if $(PORT),--api-port $(PORT),); \
	else \
		$(BIN)/muster install --host-storage-path $(STORAGE) \
			$(if $(PORT),--api-port $(PORT),) $(if $(HOST_IP),--host-ip $(HOST_IP),); \
	fi

test: $(STAMP) ## run the checks and every test
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/test

check: $(STAMP) ## ruff format --check, ruff check, mypy --strict, the layers (lint-imports)
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/check

bench: $(STAMP) ## the benchmarks (quick; FULL=1 for the whole table)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m bench $(if $(FULL),--full,)

demo: $(STAMP) ## the tutorial on this machine: first host, a token, two more hosts, the allocators
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m bench.demo

fuzz: $(STAMP) ## fuzz every API operation with hundreds of examples (long; MUSTER_FUZZ_EXAMPLES=N)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -p no:cacheprovider tests/fuzz --fuzz-long -q

clean: ## remove the virtual environment and local state
	rm -rf $(VENV) var
