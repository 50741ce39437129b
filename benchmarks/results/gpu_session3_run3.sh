#!/usr/bin/env bash
# Session-3 device call 3: build jax_fmha (sm_90a) as committed plus a 64-key d128 prefill
# variant; run every GPU test suite, the compute-sanitizer memcheck subsets (attention, and
# the RMSNorm kernels), the MLP benchmark with tokamax, and the prefill/decode timing script
# for the build and (prefill only) the variant. Carry .whl_mlp (cutlass + tokamax).
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
    && sed -i "$N64" /tmp/src_n64/ffi/cuda/attention/kernel_traits.cuh \
    && JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q --target /tmp/var_n64 \
      -C build-dir=/tmp/build_n64 -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real /tmp/src_n64 ) > /tmp/build_n64.log 2>&1 &
  wait; echo "builds: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log /tmp/build_n64.log
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
} 2>&1 | tee "$OUT/tests.txt"
cd /tmp
timeout 150 python3 "$REPO/benchmarks/mlp.py" --backend gpu --machine "nvidia-h200 (device tool)" \
  --out "$OUT/mlp_gpu_h200.json" 2>&1 | tee "$OUT/mlp.txt"
timeout 240 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"; sed -n '/summary:/,$p' "$OUT/bench.txt"
echo "== variant N64: $N64"
PYTHONPATH=/tmp/var_n64:/tmp/site timeout 100 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --variant \
  2>&1 | sed -n '/summary:/,$p' | tee "$OUT/variant_n64.txt"
