# Quick start:  `make run`  (set up, then drive 60 frames into drive.mp4)
#               `make test` (set up, then run the tests)
# GPU users: install your CUDA build of torch into .venv first (or `make setup TORCH=torch`);
# a torch that is already importable is kept.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
ARGS   ?=
# Test processes: each takes whole test files, with a Ray of its own where they need one.
TEST_WORKERS ?= 2

CHROMIUM ?= /usr/bin/chromium

.PHONY: setup browser run test bench clean
setup: $(VENV)/.installed

# The browser page test drives Debian's Chromium; installed here when missing and we may
# (root with apt-get), otherwise the test says how to install it.
browser:
	@test -x $(CHROMIUM) || command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: no Chromium; the browser page test needs it: sudo apt-get install chromium"; fi; }

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(PY) -m dwm.run $(ARGS)

test: setup browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

bench: setup
	$(PY) -m bench.bench_conditions
	$(PY) -m bench.bench_loop
	$(PY) -m bench.bench_serve
	$(PY) -m bench.bench_latency
	$(PY) -m bench.bench_model
	$(PY) -m bench.bench_pool
	$(PY) -m bench.bench_carla

clean:
	rm -rf $(VENV) .pytest_cache
