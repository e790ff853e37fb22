# Set-up and entry points. Everything installs into .venv on first use.
#   make demo    offline demo on a bundled photo (cached hub checkpoint, else random weights, said so)
#   make test    ruff + the whole test suite on the CPU (Triton kernels under TRITON_INTERPRET=1)
#   make bench   the benchmark suite (GPU providers need a CUDA GPU; CPU runs a tiny smoke config)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 resolves to the local CPU wheel on our CI machines; use TORCH=torch for your platform's latest.
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench clean

# About 4 GiB when installed (torch 0.75, triton 1.0, the reference and bench extras; triton 3.6 another 0.65),
# plus pip's unpacking room: a clear message beats pip's "No space left on device" halfway through.
NEEDED_GIB ?= 5
CHECK_DISK = $(PYTHON) -c "import shutil, sys, tempfile; \
	low = [(p, shutil.disk_usage(p).free / 2**30) for p in ('.', tempfile.gettempdir())]; \
	low = [(p, f) for p, f in low if f < $(NEEDED_GIB)]; \
	[print(f'make: {p!r} has {f:.1f} GiB free; setting up $(VENV) needs about $(NEEDED_GIB) GiB', file=sys.stderr) for p, f in low]; \
	sys.exit(1 if low else 0)"

$(VENV)/.installed: pyproject.toml
	$(CHECK_DISK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench,datasets,export]"
	# Hugging Face's `kernels` (0.11.7 works with huggingface_hub 0.x), kept aside: tests/test_wheel.py
	# checks it imports beside our installed wheel (a top-level name both packages once claimed)
	$(PY) -m pip install -q --no-deps --target $(VENV)/hf-kernels "kernels==0.11.7"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/vithybrid-fast demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest exits 5 when it collected nothing: an empty suite is a failure here, said plainly.
# triton 3.6.0 (the GPU machines' version) beside the venv's: tests/test_gpu_targets.py compiles every kernel
# offline with it too, from PYTHONPATH=.venv/triton36 (--no-deps: the venv's other packages serve it).
$(VENV)/triton36/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton36 "triton==3.6.0"
	touch $@

# TEST_WORKERS: pytest-xdist processes (0: one process). Whole files go to one worker (--dist loadfile), so a
# module's fixtures are built once. Two on the 2-core CI machine: 13.8 min against 22.4 min in one process
# (one run each). More cores: `make test TEST_WORKERS=8`; each worker holds its own torch and models.
# --benchmark-disable: pytest-benchmark's cases run once and assert their output (xdist cannot time them).
# --durations: the slowest tests close every CI log, so its wall time (30 min at most) is watched.
TEST_WORKERS ?= 2
test: lint $(VENV)/triton36/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --benchmark-disable \
		--durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(VENV)/.installed
	$(PY) -m vithybrid_fast.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
