# Quick start:  `make run`  (set up, then drive 60 frames into drive.mp4)
#               `make test` (set up, then run the tests)
# GPU users: install your CUDA build of torch into .venv first (or `make setup TORCH=torch`);
# a torch that is already importable is kept.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
ARGS   ?=

.PHONY: setup run test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(PY) -m dwm.run $(ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.bench_conditions
	$(PY) -m bench.bench_loop

clean:
	rm -rf $(VENV) .pytest_cache
