# One-command set-up: `make demo` (the main job) and `make test` each create what they need.
#   .venv (git-ignored) <- requirements/*.txt, detectron2 (only if not importable), this package
#   with its compiled extension. Stamps make a second run reuse all of it and start in seconds.
# CUDA kernels are compiled when CUDA is available or FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MAX_JOBS ?= 2
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
BUILD_ENV := FORCE_CUDA=$(FORCE_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)

.PHONY: all demo test bench lint clean gpu-check
all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.deps: $(PY) requirements/base.txt requirements/test.txt tools/install_detectron2.py
	$(PIP) install -q -r requirements/test.txt
	$(PY) tools/install_detectron2.py
	touch $@

# Rebuilt when the sources or the CUDA build settings change.
$(VENV)/.build: $(VENV)/.deps $(SOURCES) $(VENV)/.build-env
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import deformable_detr; print('deformable_detr build:', deformable_detr.build_info())"
	touch $@

$(VENV)/.build-env: $(PY) FORCE
	@echo "$(BUILD_ENV)" | cmp -s - $@ || echo "$(BUILD_ENV)" > $@

FORCE:

test: $(VENV)/.build
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

demo: $(VENV)/.build
	$(PY) tools/run_demo.py $(DEMO_ARGS)

bench: $(VENV)/.build
	$(PY) benchmarks/ms_deform_attn.py
	$(PY) benchmarks/model.py

# On a machine with an NVIDIA GPU: build for its architecture, run the CUDA tests and the
# benchmarks, write output/gpu_check/gpu_check_report.md (docs/gpu_check.md). Exits with an
# error (the script's status 2) before building anything when there is no GPU. Runs with the
# project's venv where one was made, else with $(PYTHON) (e.g. a GPU machine's own PyTorch).
GPU_PYTHON ?= $(if $(wildcard $(VENV)/.deps),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

clean:
	rm -rf build projects/deformable_detr/_C*.so $(VENV)/.build
