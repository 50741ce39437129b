#!/usr/bin/env bash
# Session-4 device call 3 (final code): build; every GPU test suite; compute-sanitizer
# memcheck on the attention subset and on the RMSNorm tests; the launch-shape sweep (the
# shipped launcher line now uses 2 vectors x 256 threads for the residual op); the MLP
# benchmark with the in-program timing and tokamax; kernel-only device times under ncu.
# Carry .whl_mlp (cutlass + tokamax).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site ${WHL:-.whl_mlp}/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  start=$(date +%s)
  JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=/tmp/build \
    -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . > /tmp/build.log 2>&1 &
  INC=$(python3 -c "import jaxlib, os; print(os.path.join(jaxlib.__path__[0], 'include'))")
  nvcc -O3 -std=c++17 -arch=sm_90a -Iffi -isystem $INC -DMLP_SOURCE='"cuda/mlp.cu"' \
    benchmarks/results/rms_norm_sweep.cu -o /tmp/sweep &
  wait; echo "build: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log
  cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info())"
  for t in test_attention_gpu.py "test_attention.py test_paged.py" test_mlp.py; do
    echo "== pytest $t"
    (cd "$REPO/tests" && timeout 200 python3 -m pytest -q -p no:cacheprovider -rf \
      $( [ "$t" = test_attention_gpu.py ] || echo "-k gpu") $t 2>&1 | grep -E "^FAILED|passed|failed|error" | tail -8)
  done
  echo "== compute-sanitizer memcheck subset (attention)"
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 "$REPO/tests/test_attention_gpu.py" --memcheck 2>&1 | tail -4; echo "memcheck rc=${PIPESTATUS[0]}"
  echo "== compute-sanitizer memcheck (RMSNorm kernels: every hidden size, bf16 and f32)"
  (cd "$REPO/tests" && timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 -m pytest -q -p no:cacheprovider -k "gpu and rms_norm and (bfloat16 or float32)" test_mlp.py 2>&1 | tail -4; echo "memcheck rc=${PIPESTATUS[0]}")
  echo "== sweep"; /tmp/sweep
} 2>&1 | tee "$OUT/tests.txt"
cd /tmp
timeout 240 python3 "$REPO/benchmarks/mlp.py" --backend gpu --machine "nvidia-h200 (device tool)" \
  --out "$OUT/mlp_gpu_h200.json" 2>&1 | tee "$OUT/mlp.txt"
{
  timeout 150 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    python3 "$REPO/benchmarks/results/mlp_device_time.py" > /tmp/ncu_mlp.csv 2> /tmp/ncu_mlp.err
  echo "ncu rc=$?"; tail -3 /tmp/ncu_mlp.err
  python3 "$REPO/benchmarks/results/mlp_device_time.py" --parse /tmp/ncu_mlp.csv
} 2>&1 | tee "$OUT/mlp_device_time.txt"
