# KD-MSI change detection: set-up, tests, demo, benchmarks and packaging.
# `make test` and `make demo` do all the set-up they need on a fresh Debian 12 machine (as root).

SHELL := /bin/bash
SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
KDMSI := $(VENV)/bin/kdmsi
STAMP := $(VENV)/.kdmsi-setup-done
APT_PACKAGES := qgis python3-qgis python3-rasterio python3-geopandas python3-shapely python3-venv gdal-bin xvfb
# On a CUDA machine, override with e.g. `make setup TORCH_SPEC="torch==2.13.0"` from a CUDA index.
TORCH_SPEC ?= torch==2.13.0
export QT_QPA_PLATFORM ?= offscreen
export PYTHONUNBUFFERED := 1
export OMP_WAIT_POLICY ?= PASSIVE

define PIN_SYSTEM_PACKAGES
from importlib.metadata import version, PackageNotFoundError
for name in ("numpy", "shapely", "rasterio", "pyproj", "geopandas", "pandas", "fiona"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
endef
export PIN_SYSTEM_PACKAGES

.PHONY: setup test lint demo bench bench-distributed bench-cluster accuracy ablation active-learning package clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing system packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@test -x $(PY) || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	@# Pin the system's GIS stack so pip never shadows it with wheels that carry another GDAL.
	$(SYSTEM_PYTHON) -c "$$PIN_SYSTEM_PACKAGES" > $(VENV)/system-constraints.txt
	$(PY) -m pip install -q -c $(VENV)/system-constraints.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(VENV)/system-constraints.txt --no-build-isolation -e '.[test]'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check kdmsi_engine kdmsi_qgis benchmarks scripts tests
	$(VENV)/bin/ruff format --check kdmsi_engine kdmsi_qgis benchmarks scripts tests
	$(VENV)/bin/bandit -q -r kdmsi_qgis kdmsi_engine benchmarks scripts --severity-level medium
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m scripts.demo

bench: setup
	$(PY) -m benchmarks.bench

bench-distributed: setup
	$(PY) -m benchmarks.distributed

bench-cluster: setup
	$(PY) -m benchmarks.cluster

accuracy: setup
	$(PY) -m benchmarks.accuracy

ablation: setup
	$(PY) -m benchmarks.ablation

active-learning: setup
	$(PY) -m benchmarks.active_learning

package: setup
	$(PY) -m scripts.package

clean:
	rm -rf dist build .pytest_cache demo-output bench-output detector-eval-output ablation-output accuracy-output active-learning-output
