# The two commands of the README: `make demo` and `make test`. Both create/refresh .venv,
# install torch (TORCH_SPEC overrides the CPU build) and build the extension.

PYTHON ?= python3.11
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90
PYTEST_ARGS ?= --durations=20
DEPS := pybind11 ninja setuptools wheel numpy scipy nibabel pydicom scikit-learn tqdm matplotlib pillow \
        pytest pytest-benchmark
# test-only: a second, independent reader of the CT geometry (tests/test_second_reader.py);
# highdicom: the optional DICOM SEG writer (medad_fast[dicom-seg]), tested by tests/test_dicom_seg.py;
# onnx, onnxscript (torch.onnx.export), onnxruntime: `medad-fast export --format onnx` and scoring with
# the file (medad_fast[onnx]), tested by tests/test_export.py
TEST_DEPS := SimpleITK highdicom onnx onnxscript onnxruntime
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
STAMP := $(VENV)/.medad_fast-built

.PHONY: setup test demo ablations compare reproduce bench cuda-check clean

setup: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Rebuilt when the venv is new or a C++/CUDA source or the build files changed.
$(STAMP): $(VPY) $(EXT_SOURCES)
	$(VPY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(VPY) -m pip install -q --disable-pip-version-check $(DEPS)
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation -e .
	$(VENV)/bin/medad-fast info
	touch $(STAMP)

test: setup $(VENV)/.test-deps
	$(VPY) -m pytest tests -q $(PYTEST_ARGS)

$(VENV)/.test-deps: $(VPY)
	$(VPY) -m pip install -q --disable-pip-version-check $(TEST_DEPS)
	touch $@

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

# The paper's ablations on the demo's data (run `make demo` first): one table, about an hour.
ablations: setup
	$(VPY) scripts/ablations.py --data $${DEMO_OUT:-demo_out}/data --out $${DEMO_OUT:-demo_out}/ablations

# Every method on the demo's data (written first if `make demo` has not): one table
# (compare.md, compare.json, roc.png), under an hour on 2 CPU cores; resumable. The demo data has
# no unlabeled pool disjoint from its test split, so ddad runs inductive as DDAD's NDM-only
# variant (its row says "NDM only"); the test split is never its unlabeled set.
DEMO_DATA = $${DEMO_OUT:-demo_out}/data
compare: setup
	@test -d $(DEMO_DATA)/train/good || $(VENV)/bin/medad-fast phantom $(DEMO_DATA) --train 200 --test 100 --seed 0 --no-progress
	$(VENV)/bin/medad-fast compare --data $(DEMO_DATA) --preset small --out $${DEMO_OUT:-demo_out}/compare $(COMPARE_ARGS)

# The published AE (and DDAD, SQUID where they have a medianomaly preset) on BrainTumor at the
# MedIAnomaly protocol, 3 seeds, next to the published figures (resumable; hours on a 2-core CPU)
REPRODUCE_DATA ?= ../shared/data/braintumor-medianomaly
REPRODUCE_ARGS ?=
reproduce: setup
	$(VPY) benchmarks/reproduce_medianomaly.py --root $(REPRODUCE_DATA) --out $${DEMO_OUT:-demo_out}/reproduce $(REPRODUCE_ARGS)

bench: setup
	$(VPY) benchmarks/report.py

# Compile every CUDA source with nvcc (no torch headers needed), for each architecture.
cuda-check:
	@command -v $(NVCC) >/dev/null || { echo "cuda-check: $(NVCC) not found on PATH"; exit 1; }
	@mkdir -p .cuda-check
	@set -e; for src in csrc/cuda/*.cu; do \
	  for arch in $(CUDA_ARCHS); do \
	    echo "nvcc -c $$src (sm_$$arch)"; \
	    $(NVCC) -c -std=c++20 -O3 --expt-relaxed-constexpr -Icsrc/include \
	      -gencode arch=compute_$$arch,code=sm_$$arch "$$src" -o .cuda-check/$$(basename $$src .cu).sm_$$arch.o; \
	  done; \
	done
	@echo "cuda-check: all CUDA sources compile for sm_$(subst $() $(),$(comma) sm_,$(CUDA_ARCHS))"

comma := ,

clean:
	rm -rf build .cuda-check medad_fast/_C*.so *.egg-info
