#!/usr/bin/env bash
# The GPU work, as steps that each end in under 8 minutes: one step per device call (10-minute limit,
# 15 minutes of device time per session), each writing to $OUT as it goes, so a call cut off keeps
# what it did. See CONTRIBUTING.md ("Benchmarking on a GPU").
#
# Here (with package registries) first:   bash bench/gpu_session.sh --fetch-wheels
#   → .whl/ (git-ignored, ~15 MB): transformers 4.47.1 and the two pins it needs that the GPU image
#     lacks (huggingface_hub < 1, tokenizers < 0.22), built for the image's Python 3.12.
# Then one device call per step, from the repo root, with `carry: [".whl"]`:
#   bash bench/gpu_session.sh list                  the steps, in the order worth spending minutes on
#   bash bench/gpu_session.sh step doctor           versions, GPU; each kernel + the model vs float64; drift
#   bash bench/gpu_session.sh step tests-kernels [NAME]   kernel parity tests (NAME: attention, … one file)
#   bash bench/gpu_session.sh step tests-model      the other tests on the GPU (patching, HF parity, graphs, …)
#   bash bench/gpu_session.sh step tests-list FILE  the test files / node ids FILE lists (e.g. what a cut-off run left)
#   bash bench/gpu_session.sh step profile [PROVIDERS]   top kernels per forward (PROFILE_BATCHES, default 64,1)
#   bash bench/gpu_session.sh step profile-train [PROVIDERS]   top kernels per bf16 training step (PROFILE_TRAIN_BATCH, 64)
#   bash bench/gpu_session.sh step kernels-attention | kernels-backbone | kernels-mlp | kernels-glue   microbenchmarks
#   bash bench/gpu_session.sh step e2e [DTYPE]      end to end, every non-compile provider (default bfloat16)
#   bash bench/gpu_session.sh step e2e-compile [DTYPE]   the torch.compile providers (slow to compile)
#   bash bench/gpu_session.sh step sweep-gemm [DTYPE]   fused-GEMM tiles vs cuBLAS + ops (SWEEP_BATCH, default 64)
#   bash bench/gpu_session.sh step sweep-gn [DTYPE]     GroupNorm group-loop tiles/hints vs torch (SWEEP_BATCH, 64)
#   bash bench/gpu_session.sh step tune [DTYPES]    autotune; the winning configs into $OUT/configs
#   bash bench/gpu_session.sh step train [DTYPES]   training steps/s: ours-triton vs ref-sdpa vs compile (bench_train)
#   bash bench/gpu_session.sh step input            the host's decode + preprocessing images/s per worker count
#   bash bench/gpu_session.sh step resize           eval --resize-on device: the GPU's resize + crop images/s
#   bash bench/gpu_session.sh plan doctor@60 tests-kernels@100 e2e=bfloat16@120 …   several steps, one call
# Knobs: PYTEST_WORKERS (xdist workers for test steps), E2E_PROVIDERS, INPUT_MODES and INPUT_WORKERS (the input step), TRAIN_PROVIDERS (e.g. adding ours-triton-ckpt), TRAIN_REPS (steps timed per provider, default 10), STEP_BUDGET_S (default 400: the step's main command is stopped there, with SIGINT, and reports
# what it measured), BATCHES (default 1,8,64), OUT (default ./bench-results/gpu-session, git-ignored),
# PYTHON (default python3), DEVICE (default cuda), WHEELS (default .whl).
#
# What comes back (at most 8 files): $OUT/env.txt, $OUT/<step>.log (tee'd as it runs), and per bench
# step the records as JSON lines (one per measurement, appended as measured) + .json/.md/.png report.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu-session}
BUDGET=${STEP_BUDGET_S:-400}
BATCHES=${BATCHES:-1,8,64}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu PYTHON=.venv/bin/python: a dry run of the steps' mechanics on a CPU
WHEELS=${WHEELS:-.whl}
STEPS="doctor tests-kernels tests-model tests-list profile profile-train sweep-gemm sweep-gn tune train input resize kernels-attention kernels-backbone kernels-mlp kernels-glue e2e e2e-compile"
WORKERS=${PYTEST_WORKERS:-}  # pytest-xdist workers for the test steps (the GPU image has xdist); empty: one process
E2E_PROVIDERS=${E2E_PROVIDERS:-"ref-eager,ref-sdpa,hf-eager,hf-sdpa,ours-triton,ours-triton-cudagraphs,ours-auto,ours-auto-cudagraphs,ours-triton-channels-last"}
COMPILE_PROVIDERS="compile-default,compile-max-autotune,ours-triton-compile"

fetch_wheels() {
  mkdir -p .whl
  for spec in "transformers==4.47.1" "huggingface_hub==0.36.2" "tokenizers==0.21.4"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$spec" || exit 1
  done
  du -sh .whl
}

setup() {
  export PYTHONUNBUFFERED=1
  mkdir -p "$OUT"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  else
    echo "no $WHEELS/*.whl: the transformers peer and the transformers parity tests will be skipped" >&2
    export PYTHONPATH=$PWD  # the source tree, uninstalled: vithybrid_fast finds kernels/ and bench/ beside it
  fi
  {
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    else echo "no nvidia-smi on this machine (DEVICE=$DEVICE)"; fi
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    # the commit may be stale on a copied tree ("-dirty" says so); the digest names the code that ran
    echo "commit $(git describe --always --dirty --abbrev=7 2>/dev/null || echo unknown)"
    echo "source $("$PYTHON" -m vithybrid_fast.bench --source-digest)"
  } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

# within_budget LOG CMD...: run CMD, tee'd to LOG as it goes; SIGINT at the budget (pytest and the bench
# then write what they have), SIGKILL 20 s later if it still runs: with setup, a step ends in < 8 min.
within_budget() {
  local log=$1
  shift
  echo "+ $* (budget ${BUDGET} s)" | tee -a "$log"
  timeout -s INT -k 20 "$BUDGET" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 130 ] || [ "$rc" = 137 ]; then
    echo "stopped at the ${BUDGET} s budget (exit $rc): results so far are in $OUT" | tee -a "$log"
  fi
  return "$rc"
}

bench_step() {  # bench_step NAME BENCH-ARGS...: the bench into $OUT; a report even if it was killed
  local name=$1 dir n=2
  shift
  dir="$OUT/$name"  # one folder per bench step: the reports are named by GPU and date alone, so the same
  while compgen -G "$dir/*.jsonl" >/dev/null; do  # step run again (a later call on a warm machine) gets
    dir="$OUT/$name-$n" n=$((n + 1))              # a folder of its own rather than replacing that report
  done
  mkdir -p "$dir"
  within_budget "$OUT/$name.log" "$PYTHON" -m vithybrid_fast.bench --device "$DEVICE" --batches "$BATCHES" \
    --output-dir "$dir" "$@"
  local rc=$? newest
  newest=$(ls -t "$dir"/*.jsonl 2>/dev/null | head -n 1)
  if [ "$rc" != 0 ] && [ "$rc" != 130 ] && [ -n "$newest" ]; then  # killed before its own report
    "$PYTHON" -m vithybrid_fast.bench --from-jsonl "$newest" --output-dir "$dir" >>"$OUT/$name.log" 2>&1
  fi
  return "$rc"
}

pytest_step() {  # pytest_step NAME FILES...: verbose, so the log says test by test what passed so far;
  # each failure's traceback goes to $OUT/NAME-failures.log at once (a run stopped at its budget prints no summary)
  local name=$1
  shift
  VITHYBRID_TEST_FAILURES="$OUT/$name-failures.log" \
    within_budget "$OUT/$name.log" "$PYTHON" -m pytest "$@" -v -p no:cacheprovider --tb=short -rfEs \
    ${WORKERS:+-n "$WORKERS"} --junitxml="$OUT/$name.xml"
}

model_test_files() {  # every test file but the kernel ones and those that only make sense on a CPU
  ls tests/test_*.py | grep -v -E 'tests/test_(kernel_|gpu_targets|gpu_real_shapes|wheel|bench_smoke|bench_pytest)'
}

run_step() {
  local step=$1 arg=${2:-} dtype=${2:-bfloat16}
  case "$step" in
    doctor)  # bfloat16 (the users' dtype) checked and attributed first, then the other two
      BUDGET=$((BUDGET * 3 / 5)) within_budget "$OUT/doctor.log" \
        "$PYTHON" -m vithybrid_fast doctor --check --drift --dtypes bfloat16 --drift-dtype bfloat16 \
        --batch "${DOCTOR_BATCH:-8}"
      BUDGET=$((BUDGET * 2 / 5)) within_budget "$OUT/doctor.log" \
        "$PYTHON" -m vithybrid_fast doctor --check --dtypes float16,float32 --batch "${DOCTOR_BATCH:-8}"
      ;;
    tests-kernels)  # without NAME: every kernel file, and every kernel at the checkpoint's real shapes first
      if [ -n "$arg" ]; then pytest_step "tests-kernels-$arg" "tests/test_kernel_$arg.py"
      else pytest_step tests-kernels tests/test_gpu_real_shapes.py tests/test_kernel_*.py; fi ;;
    tests-model) pytest_step tests-model $(model_test_files) ;;
    tests-list)  # ARG: a file of test files / node ids, one per line (ids may hold spaces and brackets)
      local ids
      mapfile -t ids < <(grep -v '^[[:space:]]*$' "$arg" 2>/dev/null)
      # no ids: pytest would collect the whole suite and spend the call's device time on it
      if [ "${#ids[@]}" = 0 ]; then echo "tests-list: '$arg' lists no tests (or is missing): nothing to run" >&2; return 2; fi
      pytest_step tests-list "${ids[@]}" ;;
    profile)  # top kernels per forward, ours vs the reference (ARG: providers, default ref-sdpa,ours-triton)
      within_budget "$OUT/profile.log" "$PYTHON" -m vithybrid_fast.bench.profile_e2e --batches "${PROFILE_BATCHES:-64,1}" \
        --providers "${arg:-ref-sdpa,ours-triton}" --out "$OUT/profile.jsonl" ;;
    profile-train)  # top kernels per training step (ARG: providers, default ours-triton,compile-default);
      # DEVICE=cpu: the tiny config at batch 2, the mechanics only
      local size="--config base --batch ${PROFILE_TRAIN_BATCH:-64}"
      [ "$DEVICE" = cpu ] && size="--config tiny --batch 2"
      within_budget "$OUT/profile-train.log" "$PYTHON" -m vithybrid_fast.bench.profile_train --device "$DEVICE" \
        $size --dtype "${PROFILE_TRAIN_DTYPE:-bfloat16}" --providers "${arg:-ours-triton,compile-default}" \
        --out "$OUT/profile-train.jsonl" ;;
    sweep-gemm)  # every candidate tile on the four ViT GEMMs vs cuBLAS + separate ops (ARG: dtype)
      within_budget "$OUT/sweep-gemm.log" "$PYTHON" -m vithybrid_fast.bench.sweep_fused_linear --batch "${SWEEP_BATCH:-64}" \
        --dtype "${arg:-bfloat16}" --out "$OUT/sweep-gemm.jsonl" ;;
    sweep-gn)  # group_norm_act's group loop: tiles, warps, L2 hints and the split path per shape (ARG: dtype)
      within_budget "$OUT/sweep-gn.log" "$PYTHON" -m vithybrid_fast.bench.sweep_group_norm --batch "${SWEEP_BATCH:-64}" \
        --dtype "${arg:-bfloat16}" --out "$OUT/sweep-gn.jsonl" ;;
    tune)  # winners into $OUT/configs/<kernel>.json, to be merged into kernels/configs and committed
      within_budget "$OUT/tune.log" "$PYTHON" -m vithybrid_fast tune --dtypes "${arg:-bfloat16}" --batches "$BATCHES" \
        --no-backward --out "$OUT/configs" ;;
    train)  # one optimizer step (fwd, bwd, clip, AdamW) per provider; fp16 with loss scaling as finetune
      within_budget "$OUT/train.log" "$PYTHON" -m vithybrid_fast.bench.bench_train --batches "${TRAIN_BATCHES:-32,64}" \
        --dtypes "${arg:-bfloat16,float16}" ${TRAIN_PROVIDERS:+--providers "$TRAIN_PROVIDERS"} \
        ${TRAIN_REPS:+--reps "$TRAIN_REPS"} --out "$OUT/train.json" ;;
    resize)  # eval --resize-on device's resize + crop on the GPU (batch 64: one size, then 8 sizes) vs Pillow
      local args="--batch 64"
      [ "$DEVICE" = cpu ] && args="--batch 4 --reps 2"
      for mixed in "" --mixed; do
        BUDGET=$((BUDGET / 2)) within_budget "$OUT/resize.log" "$PYTHON" -m vithybrid_fast.bench.bench_device_resize \
          --device "$DEVICE" $args $mixed --out "$OUT/resize.jsonl"
      done ;;
    input)  # CPU side: can the DataLoader workers feed the GPU's images/s? (no GPU used)
      within_budget "$OUT/input.log" "$PYTHON" -m vithybrid_fast.bench.bench_input --workers "${INPUT_WORKERS:-0,1,4,8,14}" \
        ${INPUT_MODES:+--modes "$INPUT_MODES"} --out "$OUT/input.json" ;;
    kernels-attention) bench_step kernels-attention --no-e2e --kernels --kernel-benches attention ;;
    kernels-backbone) bench_step kernels-backbone --no-e2e --kernels --kernel-benches backbone ;;
    kernels-mlp) bench_step kernels-mlp --no-e2e --kernels --kernel-benches layer_norm_mlp ;;
    kernels-glue) bench_step kernels-glue --no-e2e --kernels --kernel-benches add_layer_norm ;;
    e2e) bench_step "e2e-$dtype" --no-kernels --dtypes "$dtype" --providers "$E2E_PROVIDERS" ;;
    e2e-compile) bench_step "e2e-compile-$dtype" --no-kernels --dtypes "$dtype" --providers "$COMPILE_PROVIDERS" ;;
    *) echo "unknown step '$step'; steps: $STEPS" >&2; return 2 ;;
  esac
}

case "${1:-}" in
  --fetch-wheels) fetch_wheels ;;
  list)
    echo "steps (one per device call, each under 8 minutes): $STEPS"
    echo "e2e and e2e-compile take a dtype: float32 | float16 | bfloat16 (default);"
    echo "tests-kernels takes a kernel test file's name: $(ls tests/test_kernel_*.py | sed 's/.*test_kernel_//; s/\.py//' | tr '\n' ' ')"
    ;;
  plan)  # plan STEP[=ARG]@SECONDS ...: several steps in one device call, each under its own budget; after
    # each, everything so far is packed into $OUT/gpu-session.tgz (the 8-file limit on what comes back)
    shift
    FINAL_OUT=$OUT
    OUT=${PLAN_WORK:-/tmp/gpu-session-work}
    setup
    for item in "$@"; do
      spec=${item%@*} seconds=${item##*@}
      # a missing or non-numeric budget would reach `timeout` as garbage: that step fails at once, unexplained
      case "$item:$seconds" in *@*:[0-9]*) ;; *) echo "'$item': give each step a budget, STEP[=ARG]@SECONDS" >&2; continue ;; esac
      case "$seconds" in *[!0-9]*) echo "'$item': SECONDS must be a whole number" >&2; continue ;; esac
      step=${spec%%=*} arg=""
      [ "$spec" != "$step" ] && arg=${spec#*=}
      case " $STEPS " in *" $step "*) ;; *) echo "unknown step '$step'" >&2; continue ;; esac
      echo "=== $step $arg (${seconds} s) $(date +%T)" | tee -a "$OUT/plan.log"
      BUDGET=$seconds run_step "$step" "$arg"
      echo "=== $step $arg: exit $? $(date +%T)" | tee -a "$OUT/plan.log"
      mkdir -p "$FINAL_OUT" && tar czf "$FINAL_OUT/gpu-session.tgz" -C "$OUT" . && cp "$OUT/plan.log" "$FINAL_OUT/"
    done
    ;;
  step)
    case " $STEPS " in
      *" ${2:-?} "*) ;;
      *) echo "usage: bash bench/gpu_session.sh step NAME [ARG]; steps: $STEPS" >&2; exit 2 ;;
    esac
    setup
    run_step "$2" "${3:-}"
    rc=$?
    echo "step ${*:2}: exit $rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    exit "$rc"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh --fetch-wheels | list | step NAME [ARG] | plan STEP[=ARG]@SECONDS ..." >&2
    echo "steps: $STEPS" >&2
    exit 2
    ;;
esac
