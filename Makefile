# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
# Optional: a PyTorch wheel index for torch only, e.g. https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[all,test]"
	touch $(STAMP)

demo: $(STAMP)
	MPLBACKEND=Agg $(VENV)/bin/bnkit demo

test: $(STAMP)
	KERAS_BACKEND=torch MPLBACKEND=Agg $(PY) -m pytest -n 2 -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) bnkit-report .pytest_cache
