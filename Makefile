# Two commands set up a fresh machine: `make serve` and `make test`. Each creates or refreshes the
# virtualenv in .venv first. torch is pinned and installed first: 2.13.0 has a CPU build on local
# disk, while an open range would pull a 5 GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.taxiway-installed
CONFIG ?=
SERVE_ARGS ?=
PYTEST_ARGS ?=

# The playground's browser test drives Debian's chromium with its chromedriver (root, or sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: venv browser serve test bench-gateway

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install 'setuptools>=68' wheel
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[engine,bench,test]'
	touch $(STAMP)

browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

serve: venv
	$(BIN)/taxiway serve $(if $(CONFIG),--config $(CONFIG)) $(SERVE_ARGS)

test: venv browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench-gateway: venv
	$(BIN)/taxiway bench gateway
