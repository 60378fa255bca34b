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

.PHONY: all demo test test-d2-source bench lint clean gpu-check
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

# `make test-d2-source`: the same tests against detectron2 built from its current source
# (D2_SOURCE, a `git archive` tarball: ../shared/vendor/README.md), with its compiled ops built
# for the CPU. .venv-d2src holds only that detectron2 and timm (its ViT, Swin and MViT import
# it); torch, the test requirements and this package with its built extension come from .venv
# through a .pth file that site processes after the venv's own site-packages, so this
# detectron2 shadows .venv's 0.6 and torch is not installed a second time (5.5 GB, minutes).
# The build is CPU-only whatever FORCE_CUDA says for our extension (about 10 min on 2 cores);
# stamps make a second run start the tests at once.
D2_SOURCE ?= ../shared/vendor/detectron2-02b5c4e.tar.gz
D2SRC_VENV := .venv-d2src
D2SRC_PY := $(D2SRC_VENV)/bin/python

$(D2SRC_VENV)/.venv: $(VENV)/.deps
	rm -rf $(D2SRC_VENV)
	$(PY) -m venv --without-pip $(D2SRC_VENV)
	$(PY) -c "import sysconfig; print(f'import site; site.addsitedir({sysconfig.get_path(\"purelib\")!r})')" \
	  > "$$($(D2SRC_PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/base_venv.pth"
	touch $@

$(D2SRC_VENV)/.detectron2: $(D2SRC_VENV)/.venv $(D2_SOURCE) requirements/d2-source.txt
	rm -rf $(D2SRC_VENV)/src && mkdir -p $(D2SRC_VENV)/src
	tar -xzf $(D2_SOURCE) -C $(D2SRC_VENV)/src
	cd $(D2SRC_VENV)/src/detectron2 && FORCE_CUDA=0 CUDA_VISIBLE_DEVICES= \
	  PATH="$(abspath $(VENV))/bin:$$PATH" $(abspath $(D2SRC_PY)) -m pip install -q --no-build-isolation .
	$(D2SRC_PY) -m pip install -q -r requirements/d2-source.txt
	touch $@

test-d2-source: $(VENV)/.build $(D2SRC_VENV)/.detectron2
	$(D2SRC_PY) tools/check_d2_source_env.py
	$(D2SRC_PY) -m pytest tests -q $(PYTEST_ARGS)

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
