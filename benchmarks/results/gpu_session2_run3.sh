#!/usr/bin/env bash
# Session-2 device call 3: rebuild (sm_90a) and rerun the GPU-only attention tests and the
# compute-sanitizer memcheck subset after the test fix of call 2 (NaN-propagating NumPy merge).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD; WHL=${WHL:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHL"/nvidia_cutlass-*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,driver_version --format=csv
  JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=/tmp/build \
    -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . > /tmp/build.log 2>&1 \
    || { tail -40 /tmp/build.log; exit 1; }
  cd "$REPO/tests" && timeout 150 python3 -m pytest -q -p no:cacheprovider -rf test_attention_gpu.py 2>&1 | tail -3
  echo "== compute-sanitizer memcheck subset"
  cd /tmp && timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 "$REPO/tests/test_attention_gpu.py" --memcheck 2>&1 | tail -4; echo "memcheck rc=${PIPESTATUS[0]}"
} 2>&1 | tee "$OUT/tests.txt"
