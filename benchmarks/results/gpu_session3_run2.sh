#!/usr/bin/env bash
# Session-3 device call 2: build jax_fmha (sm_90a; RMSNorm kernel with all pass-1 loads up
# front, lazy softmax rescale) and a 64-key prefill variant at d128; run the CUDA attention
# and MLP tests, the MLP benchmark with tokamax, the prefill timing of both builds, and an
# ncu source-level (SASS) profile of the d128 prefill kernel.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site ${WHL:-.whl_mlp}/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
N64='s/static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;/static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;/'
{
  nvidia-smi --query-gpu=name,driver_version --format=csv
  start=$(date +%s)
  JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=/tmp/build \
    -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . > /tmp/build.log 2>&1 &
  ( mkdir -p /tmp/src_n64 && tar --exclude=./.whl_mlp --exclude=./.git -cf - . | tar -xf - -C /tmp/src_n64 \
    && sed -i "$N64" /tmp/src_n64/ffi/cuda/attention/kernel_traits.cuh && grep "int kBlockN =" /tmp/src_n64/ffi/cuda/attention/kernel_traits.cuh \
    && JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q --target /tmp/var_n64 \
      -C build-dir=/tmp/build_n64 -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real /tmp/src_n64 ) > /tmp/build_n64.log 2>&1 &
  wait; echo "builds: $(( $(date +%s) - start )) s"; tail -3 /tmp/build.log /tmp/build_n64.log
  cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info())"
  for t in test_attention_gpu.py test_mlp.py; do
    echo "== pytest $t"
    (cd "$REPO/tests" && timeout 200 python3 -m pytest -q -p no:cacheprovider -rf \
      $( [ "$t" = test_attention_gpu.py ] || echo "-k gpu") $t 2>&1 | grep -E "^FAILED|passed|failed|error" | tail -8)
  done
} 2>&1 | tee "$OUT/tests.txt"
cd /tmp
timeout 150 python3 "$REPO/benchmarks/mlp.py" --backend gpu --machine "nvidia-h200 (device tool)" \
  --out "$OUT/mlp_gpu.json" 2>&1 | tee "$OUT/mlp.txt"
{
  echo "== base"; timeout 100 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --variant | sed -n '/summary:/,$p'
  echo "== variant N64: $N64"
  PYTHONPATH=/tmp/var_n64:/tmp/site timeout 100 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --variant \
    | sed -n '/summary:/,$p'
} 2>&1 | tee "$OUT/variants.txt"
timeout 150 ncu -k regex:attention_forward --set full --import-source no -o /tmp/prefill \
  python3 "$REPO/benchmarks/results/ncu_targets.py" prefill > /tmp/ncu.log 2>&1; echo "ncu rc=$?"; tail -3 /tmp/ncu.log
ncu -i /tmp/prefill.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_prefill_sass.csv" 2> "$OUT/ncu_source_err.txt"
echo "source page rc=$?"; head -c 600 "$OUT/ncu_source_err.txt"; wc -c "$OUT/ncu_prefill_sass.csv"
