#!/bin/bash
# One short GPU sitting: edit speed at the LLaMA-3-8B shape in bf16 (bench/edit_speed.py, all variants),
# then the precision, family, objective, variant and engine tests with their tiny models on the GPU
# (KDPO_TEST_DEVICE=cuda). Needs no network; results go to $OUT (default bench/results/gpu).
#   ZSRE=path/to/ZsRE-test-all.json bash bench/gpu_check.sh
# About 4.5 min on an H200. A machine without the package's pure-Python needs (datasets, dill,
# multiprocess, nltk, gguf) gets them as wheels on PYTHONPATH first.
set -u
OUT=${OUT:-bench/results/gpu}
ZSRE=${ZSRE:-../shared/data/ZsRE/ZsRE-test-all.json}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PYTHON -c "import torch, transformers, lightning; print(torch.__version__, transformers.__version__, lightning.__version__)" \
  2>&1 | tee -a "$OUT/gpu.txt"
timeout "${SPEED_TIMEOUT:-300}" $PYTHON bench/edit_speed.py --device cuda --data "$ZSRE" \
  --out "$OUT/edit_speed_cuda.json" 2>&1 | tee "$OUT/edit_speed_cuda.log"
KDPO_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-240}" $PYTHON -m pytest -q -p no:cacheprovider -W ignore \
  tests/test_precision.py tests/test_families.py tests/test_objective.py tests/test_variants.py tests/test_engine.py \
  2>&1 | tee "$OUT/pytest_cuda.log"
