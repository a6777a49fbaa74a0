# make demo  - set up .venv and run the project's main job
# make test  - set up .venv and run the test suite
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# -qq: this machine's pip configuration prints a warning per package for absent local indexes
PIP := $(PY) -m pip -qq --disable-pip-version-check
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml constraints.txt $(wildcard setup.py cuda_ext/csrc/*)

.PHONY: install demo test bench clean

install: $(STAMP)

# Re-runs only when the dependency list or the C++/CUDA sources change. The extension is
# built with --no-build-isolation: an isolated build would download a multi-GB CUDA torch.
$(STAMP): $(SOURCES)
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "[install] torch, torchvision and build tools (about a minute on first run)"
	@$(PIP) install -c constraints.txt "setuptools>=68" wheel torch torchvision
	@echo "[install] bireal and its pipeline dependencies (ray, mlflow, prefect, dvc, webdataset)"
	@$(PIP) install -c constraints.txt --no-build-isolation -e ".[test]"
	@touch $(STAMP)
	@echo "[install] done: $(VENV)"

demo: install
	$(VENV)/bin/bireal demo

test: install
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
