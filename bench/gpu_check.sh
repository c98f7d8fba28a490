#!/bin/bash
# One short GPU sitting (issue 26), under 8 minutes on an H200, with no network:
#   1. edit speed at the LLaMA-3-8B shape in bf16 (bench/edit_speed.py): the paper's recipe (a), the package
#      with its steps replayed as CUDA graphs (c) and eager (e), the editor under Trainer.fit (d), and the fixed
#      cost of a 1-edit fit;
#   2. the graph, precision and engine tests with their tiny models on the GPU (KDPO_TEST_DEVICE=cuda).
# Results go to $OUT (default bench/results/gpu).
#
#   bash bench/gpu_check.sh             # on the GPU machine
#   bash bench/gpu_check.sh --dry-run   # here, on CPU: the same steps on a tiny model, in a minute
#
# The GPU machine has torch, lightning, transformers, pyarrow and pandas, not the package's pure-Python needs
# (datasets, dill, multiprocess, nltk, gguf, jsonargparse): their wheels, for its Python 3.12, go in .whl/ first
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl datasets==5.2.0 dill==0.4.1 \
#     multiprocess==0.70.19 nltk==3.10.4 gguf==0.19.0 jsonargparse==4.53.0
# and the ZsRE file in .carry/ (cp ../shared/data/ZsRE/ZsRE-test-all.json .carry/); carry both.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-bench/results/gpu}
PYTHON=${PYTHON:-python3}
ZSRE=${ZSRE:-.carry/ZsRE-test-all.json}
[ -f "$ZSRE" ] || ZSRE=../shared/data/ZsRE/ZsRE-test-all.json
mkdir -p "$OUT"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if ! $PYTHON -c "import datasets, dill, multiprocess, nltk, gguf, jsonargparse" 2>/dev/null; then  # the GPU machine's
  # missing packages, from the carried wheels, installed apart from its own
  WHEELS=$(mktemp -d)
  $PYTHON -m pip install -q --no-index --no-deps --target "$WHEELS" .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=$PYTHONPATH:$WHEELS
fi
$PYTHON -c "import torch, transformers, lightning, datasets; print(torch.__version__, transformers.__version__, \
lightning.__version__, datasets.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  2>&1 | tee "$OUT/gpu.txt"
if [ $DRY = 1 ]; then
  SPEED=(--device cpu --shape tiny --n_edits 2 --variants acde --in_process)
  TESTS=(tests/test_graphs.py)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu.txt"
  SPEED=(--device cuda --variants acde --n_edits 8)
  TESTS=(tests/test_graphs.py tests/test_precision.py tests/test_engine.py)
  export KDPO_TEST_DEVICE=cuda
fi
timeout "${SPEED_TIMEOUT:-300}" $PYTHON bench/edit_speed.py "${SPEED[@]}" --data "$ZSRE" \
  --out "$OUT/edit_speed.json" 2>&1 | tee "$OUT/edit_speed.log"
timeout "${TEST_TIMEOUT:-150}" $PYTHON -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning "${TESTS[@]}" \
  2>&1 | tee "$OUT/pytest.log"
