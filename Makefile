# One-command setup for a fresh clone (Python 3.10+, a C++ compiler).
#   make demo   - create .venv, build mmh_fast, run `mmh-fast demo`
#   make test   - create .venv, build mmh_fast, run the test suite
#   make bench  - run the benchmark suite (quick tier)
#   make cuda-check - nvcc compile check of every csrc/cuda/*.cu (needs nvcc)
# TORCH_SPEC selects the torch build (the default is the CPU wheel on this
# machine's disk; use e.g. TORCH_SPEC="torch==2.13.0 --index-url ..." for CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: demo test bench build cuda-check clean

$(VENV)/.deps: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) numpy setuptools wheel pybind11 ninja
	MMH_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,demo]"
	touch $@

# Incremental (ninja) in-place build of mmh_fast._C; a no-op when nothing changed.
# Quiet: one line, the compiler's output only when the build fails (all of it
# is kept in $(BUILD_LOG)); `make build VERBOSE=1` shows it as it runs.
BUILD_LOG ?= build/native-build.log
build: $(VENV)/.deps
ifdef VERBOSE
	$(PY) setup.py build_ext --inplace
else
	@echo "building the native extension (mmh_fast._C; log: $(BUILD_LOG)) ..."
	@mkdir -p $(dir $(BUILD_LOG))
	@$(PY) setup.py -q build_ext --inplace > $(BUILD_LOG) 2>&1 || \
		{ cat $(BUILD_LOG); echo "building the native extension FAILED (full log: $(BUILD_LOG))"; exit 1; }
endif

demo: build
	$(VENV)/bin/mmh-fast demo $(DEMO_ARGS)

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

BENCH_TIER ?= quick
# the GPU tier compares with the GPU baseline, the CPU tiers with theirs
BENCH_BASELINE ?= bench/baselines/$(if $(filter gpu,$(BENCH_TIER)),gpu,cpu-$(BENCH_TIER)).json
bench: build
	mkdir -p .benchmarks
	$(PY) -m pytest bench -q -o addopts= --benchmark-enable --benchmark-only --tier $(BENCH_TIER) \
		--benchmark-json=.benchmarks/latest.json $(BENCH_ARGS)
	$(PY) bench/check.py .benchmarks/latest.json --baseline $(BENCH_BASELINE) $(CHECK_ARGS)

cuda-check: $(VENV)/.deps
	cmake -S . -B build/cuda-check -DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cuda-check -j $(MAX_JOBS)

clean:
	rm -rf build mmh_fast/_C*.so
