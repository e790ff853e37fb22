#!/usr/bin/env bash
# Everything a lent GPU machine should run, in as few device calls as possible (CONTRIBUTING.md).
#
# Here (with package registries) first:   bash bench/gpu_session.sh --fetch-wheels
#   → .whl/ (git-ignored, ~15 MB): transformers 4.47.1 and the two pins it needs that the GPU image
#     lacks (huggingface_hub < 1, tokenizers < 0.22), built for the image's Python 3.12.
# Then one device call with `carry: [".whl"]`, from the repo root:
#   bash bench/gpu_session.sh [--quick]
#   → GPU parity tests (kernels native), kernel microbenchmarks and the end-to-end suite, results
#     under $OUT (the device tool's output folder) or bench/results. --quick: bf16, batch 1/8/64 only,
#     to stay inside one 10-minute call; the full sweep needs several calls (--dtypes/--batches).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  for spec in "transformers==4.47.1" "huggingface_hub==0.36.2" "tokenizers==0.21.4"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$spec" || exit 1
  done
  du -sh .whl
  exit 0
fi

export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/: the transformers peer and the transformers parity tests will be skipped" >&2
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/gpu.txt"

# 1. parity on the GPU: the whole suite, kernels native (tests/conftest.py sets the interpreter only without CUDA)
python3 -m pytest tests -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.txt" | tail -n 25

# 2. benchmarks: kernel microbenchmarks + end to end
if [ "${1:-}" = "--quick" ]; then
  python3 -m vithybrid_fast.bench --device cuda --dtypes bfloat16 --batches 1,8,64 --out "$OUT" 2>&1 | tee "$OUT/bench.txt" | tail -n 60
else
  python3 -m vithybrid_fast.bench --device cuda --dtypes bfloat16,float16 --batches 1,8,64,128 --out "$OUT" 2>&1 \
    | tee "$OUT/bench.txt" | tail -n 80
fi
