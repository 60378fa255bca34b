# One-command set-up: `make demo` (the main job) and `make test` each create what they need.
#   .venv (git-ignored) <- requirements/*.txt (the demo: base.txt only), detectron2 (only if
#   not importable), this package with its compiled extension. Stamps make a second run reuse
#   all of it and start in seconds.
# CUDA kernels are compiled when CUDA is available or FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MAX_JOBS ?= 2
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
BUILD_ENV := FORCE_CUDA=$(FORCE_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)

.PHONY: all demo test test-d2-source bench lint clean gpu-check
all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# What the package needs to run (the demo stops here), then what the tests add.
$(VENV)/.deps-runtime: $(PY) requirements/base.txt tools/install_detectron2.py
	$(PIP) install -q -r requirements/base.txt
	$(PY) tools/install_detectron2.py
	touch $@

$(VENV)/.deps: $(VENV)/.deps-runtime requirements/test.txt
	$(PIP) install -q -r requirements/test.txt
	touch $@

# Rebuilt when the sources or the CUDA build settings change.
$(VENV)/.build: $(VENV)/.deps-runtime $(SOURCES) $(VENV)/.build-env
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import deformable_detr; print('deformable_detr build:', deformable_detr.build_info())"
	touch $@

$(VENV)/.build-env: $(PY) FORCE
	@echo "$(BUILD_ENV)" | cmp -s - $@ || echo "$(BUILD_ENV)" > $@

FORCE:

test: $(VENV)/.build $(VENV)/.deps
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# `make test-d2-source`: the same tests against detectron2 built from its current source
# (D2_SOURCE: a `git archive` tarball of its repository, see ../shared/vendor/README.md), its
# compiled ops built for the CPU. .venv-d2src holds only that detectron2 (and what it adds,
# e.g. black) and timm (its ViT, Swin and MViT import it); torch, the test requirements and
# this package with its built extension come from .venv, through a .pth file that Python
# reads after the venv's own site-packages: this detectron2 shadows .venv's 0.6 (checked
# below) and torch is not installed a second time (5.5 GB, minutes). The detectron2 build is
# CPU-only whatever FORCE_CUDA says for our extension (measured: 2 min on an idle 2-core
# machine, 4-5 min on a busy one); stamps make a second run start the tests at once.
D2_SOURCE ?= ../shared/vendor/detectron2-02b5c4e.tar.gz
D2SRC_VENV := .venv-d2src
D2SRC_PY := $(D2SRC_VENV)/bin/python

# Rebuilt when .venv's torch may change (base.txt): detectron2's ops must match it.
$(D2SRC_VENV)/.venv: requirements/base.txt | $(VENV)/.deps
	rm -rf $(D2SRC_VENV)
	$(PY) -m venv --without-pip $(D2SRC_VENV)
	$(PY) -c "import sysconfig; print(f'import site; site.addsitedir({sysconfig.get_path(\"purelib\")!r})')" \
	  > "$$($(D2SRC_PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/base_venv.pth"
	touch $@

$(D2SRC_VENV)/.detectron2: $(D2SRC_VENV)/.venv $(wildcard $(D2_SOURCE)) requirements/d2-source.txt
	@test -f "$(D2_SOURCE)" || { echo "make test-d2-source: no detectron2 source at" \
	  "$(D2_SOURCE); set D2_SOURCE to a tarball of detectron2's repository" >&2; exit 1; }
	rm -rf $(D2SRC_VENV)/src && mkdir -p $(D2SRC_VENV)/src
	tar -xzf "$(D2_SOURCE)" -C $(D2SRC_VENV)/src --strip-components=1
	cd $(D2SRC_VENV)/src && FORCE_CUDA=0 CUDA_VISIBLE_DEVICES= PATH="$(abspath $(VENV))/bin:$$PATH" \
	  $(abspath $(D2SRC_PY)) -m pip install -q --no-build-isolation .
	$(D2SRC_PY) -m pip install -q -r requirements/d2-source.txt
	touch $@

test-d2-source: $(VENV)/.build $(D2SRC_VENV)/.detectron2
	@$(D2SRC_PY) -c "import detectron2, sys; from deformable_detr import build_info as b; \
	  where = detectron2.__file__; print('detectron2', detectron2.__version__, 'from', where, \
	  '(compiled ops:', b()['detectron2_compiled_ops'], end=')\n'); \
	  sys.exit(0 if where.startswith('$(abspath $(D2SRC_VENV))/') else 'not the source build')"
	$(D2SRC_PY) -m pytest tests -q $(PYTEST_ARGS)

demo: $(VENV)/.build
	$(PY) tools/run_demo.py $(DEMO_ARGS)

bench: $(VENV)/.build $(VENV)/.deps
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
