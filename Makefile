# The two set-up commands of the README live here:
#   make app    set everything up and launch the app on the sample data (http://127.0.0.1:8501)
#   make test   set everything up (Python packages, Debian's chromium) and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup app test lint browser-deps bench bench-quick sample-data clean

setup: $(STAMP)

# torch is installed first and pinned to the CPU build on this machine's disk: a looser request
# would pull a multi-GB CUDA build. torchvision is not a dependency.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's chromium for the real-browser test (Playwright drives /usr/bin/chromium; it never downloads a browser).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

app: setup
	$(VENV)/bin/streamlit run app.py --server.address 127.0.0.1 --server.port $${PORT:-8501} \
	  --browser.gatherUsageStats false --server.headless true

lint: setup
	$(VENV)/bin/ruff check .

test: setup browser-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

sample-data: setup
	$(PY) sample_data/build_sample_data.py

bench: setup
	$(PY) -m benchmarks.run_all

bench-quick: setup
	$(PY) -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
