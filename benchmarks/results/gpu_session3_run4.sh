#!/usr/bin/env bash
# Session-3 device call 4: build jax_fmha (sm_90a) as committed; device time of the RMSNorm
# ops under ncu (mlp_device_time.py); the attention harness's prefill and decode suites
# with every peer (cuDNN, XLA, Pallas, flash_attn3_jax). Carry .whl_fa3 (cutlass, fa3, einops).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site ${WHL:-.whl_fa3}/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=/tmp/build \
  -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
cd /tmp
{
  nvidia-smi --query-gpu=name,driver_version --format=csv
  timeout 150 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    python3 "$REPO/benchmarks/results/mlp_device_time.py" > /tmp/ncu_mlp.csv 2> /tmp/ncu_mlp.err
  echo "ncu rc=$?"; tail -3 /tmp/ncu_mlp.err
  python3 "$REPO/benchmarks/results/mlp_device_time.py" --parse /tmp/ncu_mlp.csv
  grep -c gpu__time_duration /tmp/ncu_mlp.csv
} 2>&1 | tee "$OUT/mlp_device_time.txt"
cp /tmp/ncu_mlp.csv "$OUT/"
mkdir -p /tmp/res
for suite in prefill decode; do
  timeout 240 python3 "$REPO/benchmarks/attention.py" --backend gpu --suite $suite \
    --out /tmp/res/attention_gpu_$suite.json > "$OUT/harness_$suite.txt" 2>&1
  echo "$suite harness rc=$?"; grep -E "^\[" "$OUT/harness_$suite.txt" | tail -40
done
cp /tmp/res/*.json /tmp/res/*.png "$OUT"/ 2>/dev/null; ls /tmp/res
