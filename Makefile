# Quick start: `make demo` (run the appliance with sample X-rays), `make test` (the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
APT_PACKAGES = dcmtk dicom3tools orthanc chromium prometheus shellcheck systemd sqlite3 curl logrotate
# command each package provides, to skip apt when everything is present
APT_COMMANDS = storescu dciodvfy Orthanc chromium prometheus shellcheck systemd-analyze sqlite3 curl logrotate

.PHONY: help venv install install-test system-packages demo serve test test-fast bench models clean

help:
	@echo "make demo   - set up, start the appliance and send it sample chest X-rays (Ctrl-C stops)"
	@echo "make test   - install test dependencies (Python extras, DCMTK, dicom3tools, Orthanc, Chromium, Prometheus) and run the suite"
	@echo "make bench  - end-to-end benchmark against real DICOM peers"
	@echo "make models - retrain the demonstration models (needs the 'train' extra, ~30 min on 2 cores)"

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(VENV)/bin/activate

install: venv
	$(PIP) install --quiet -e .

install-test: venv
	$(PIP) install --quiet -e '.[test]'

# Debian packages the tests use as real peers; installed only when missing and apt is available.
system-packages:
	@missing=""; for c in $(APT_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then echo "system packages: all present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "system packages: installing (missing:$$missing)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	else echo "system packages: apt-get not available; tests needing$$missing will skip"; fi

demo: install
	$(VENV)/bin/edge demo

serve: install
	$(VENV)/bin/edge serve

test: system-packages install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

bench: install-test
	$(PY) -m benchmarks.e2e

models: venv
	$(PIP) install --quiet -e '.[train]'
	$(PY) -m engines.train.train --out engines/models

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache test-artifacts
