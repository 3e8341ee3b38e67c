# Quick start: `make demo` (run the appliance with sample X-rays), `make test` (the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
APT_PACKAGES = dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-webviewer chromium prometheus shellcheck systemd sqlite3 curl logrotate npm poppler-utils
# command each package provides, to skip apt when everything is present
APT_COMMANDS = storescu dciodvfy Orthanc chromium prometheus shellcheck systemd-analyze sqlite3 curl logrotate npm pdftoppm
# files of the packages that provide no command (Orthanc's DICOMweb and web viewer plugins)
APT_FILES = /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/share/orthanc/plugins/libOrthancWebViewer.so
# the prebuilt OHIF viewer the viewer tests serve (npm package @ohif/app), unpacked once
OHIF_VERSION = 3.13.2
OHIF_DIR     = .cache/ohif-$(OHIF_VERSION)

.PHONY: help venv install install-test system-packages ohif-dist triton-server demo serve test test-fast bench models clean

help:
	@echo "make demo   - set up, start the appliance and send it sample chest X-rays (Ctrl-C stops)"
	@echo "make test   - install test dependencies (Python extras, DCMTK, dicom3tools, Orthanc and its DICOMweb/web viewer plugins, Chromium, Prometheus, the OHIF viewer) and run the suite"
	@echo "make bench  - end-to-end benchmark against real DICOM peers"
	@echo "make models - retrain the demonstration models (needs the 'train' extra, ~80 min on 2 cores)"

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
	for f in $(APT_FILES); do [ -e $$f ] || missing="$$missing $$f"; done; \
	if [ -z "$$missing" ]; then echo "system packages: all present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "system packages: installing (missing:$$missing)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	else echo "system packages: apt-get not available; tests needing$$missing will skip"; fi

# The OHIF viewer for tests/test_viewers.py: `npm pack @ohif/app` (its prebuilt dist/), once,
# into .cache/ (gitignored); the tests never download. Without npm the viewer tests skip.
ohif-dist: $(OHIF_DIR)/dist/index.html

$(OHIF_DIR)/dist/index.html:
	@if ! command -v npm >/dev/null 2>&1; then \
	  echo "OHIF viewer: npm not available; the OHIF viewer tests will skip"; exit 0; fi; \
	rm -rf $(OHIF_DIR).part && mkdir -p $(OHIF_DIR).part && \
	if (cd $(OHIF_DIR).part && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && \
	    tar -xzf ohif-app-$(OHIF_VERSION).tgz package/dist); then \
	  rm -rf $(OHIF_DIR)/dist && mkdir -p $(OHIF_DIR) && mv $(OHIF_DIR).part/package/dist $(OHIF_DIR)/dist && \
	  rm -rf $(OHIF_DIR).part && echo "OHIF viewer: $(OHIF_VERSION) unpacked into $(OHIF_DIR)/dist"; \
	else rm -rf $(OHIF_DIR).part; \
	  echo "OHIF viewer: npm pack @ohif/app@$(OHIF_VERSION) failed; the OHIF viewer tests will skip"; fi

# A real Triton Inference Server for tests/test_triton.py: the nvidia-pytriton wheel's
# tritonserver (CPU, Python backend) in its own venv, because the wheel pins numpy < 2;
# installed once into .cache/ (gitignored). Without it the Triton server tests skip.
TRITON_VENV = .cache/triton-venv
triton-server: $(TRITON_VENV)/ready

# The wheel ships one Python-backend stub per Python version; the server looks for it in
# backends/python, so the one of the venv's Python is copied there. `ready` is what the
# tests check.
$(TRITON_VENV)/ready:
	@rm -rf $(TRITON_VENV) && $(PYTHON) -m venv $(TRITON_VENV) && \
	if $(TRITON_VENV)/bin/pip install --quiet "nvidia-pytriton==0.7.0" onnxruntime "numpy<2" && \
	   server=$$($(TRITON_VENV)/bin/python -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")') && \
	   version=$$($(TRITON_VENV)/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') && \
	   cp "$$server/python_backend_stubs/$$version/triton_python_backend_stub" "$$server/backends/python/"; then \
	  touch $@ && echo "Triton test server: installed into $(TRITON_VENV)"; \
	else rm -rf $(TRITON_VENV); \
	  echo "Triton test server: installing nvidia-pytriton failed; the Triton server tests will skip"; fi

demo: install
	$(VENV)/bin/edge demo

serve: install
	$(VENV)/bin/edge serve

test: system-packages install-test ohif-dist triton-server
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
