# make demo       - set up .venv and run the project's main job
# make test       - set up .venv and run the whole test suite
# make test-fast  - the tests that start no service (about 13 minutes on 2 cores)
# make lint       - ruff: lint and format check
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# -qq: this machine's pip configuration prints a warning per package for absent local indexes
PIP := $(PY) -m pip -qq --disable-pip-version-check
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml constraints.txt $(wildcard setup.py cuda_ext/csrc/*)

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

# Re-runs only when the dependency list or the C++/CUDA sources change. The extension is
# built with --no-build-isolation: an isolated build would download a multi-GB CUDA torch.
$(STAMP): $(SOURCES)
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "[install] torch, torchvision and build tools (about a minute on first run)"
	@$(PIP) install --no-compile -c constraints.txt "setuptools>=68" wheel ninja torch torchvision
	@echo "[install] bireal with its pipeline extra (ray, mlflow, prefect, dvc, webdataset) and test tools"
	@# the venv's ninja on PATH: torch's extension builder then compiles the sources in parallel
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PIP) install --no-compile -c constraints.txt --no-build-isolation -e ".[pipeline,test]"
	@# the bytecode pip would write one file at a time, on every core (66 s -> 41 s on 2 cores); a
	@# file written for a newer Python (torch's py312_intrinsics.py) fails here as it does, unreported, under pip
	@$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") > /dev/null || true
	@touch $(STAMP)
	@echo "[install] done: $(VENV)"

# The main job on the embedded demo data: the whole pipeline through DVC (shard, the three Ray
# Train stages, export to a packed 1-bit artifact, evaluation), then where to look.
demo: install
	@$(VENV)/bin/bireal cost --arch bireal18
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	@echo
	@$(VENV)/bin/bireal summary

# five pytest processes, each within the budget (12 minutes, 6 GiB): the tests that start no
# service; the end-to-end ones (a local Ray, MLflow, Prefect, dvc repro); the tests that start
# servers of their own (faults, auth, Prefect's work pool); the cluster suite's two modules, one
# process each (its memory budget: docs/cluster.md)
test: install
	$(VENV)/bin/pytest -q -m "not e2e and not cluster and not services"
	$(VENV)/bin/pytest -q -m "e2e and not cluster and not services"
	$(VENV)/bin/pytest -q -m services
	$(VENV)/bin/pytest -q tests/test_cluster.py
	$(VENV)/bin/pytest -q tests/test_cluster_submit.py

test-fast: install
	$(VENV)/bin/pytest -q -m "not e2e and not services"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
