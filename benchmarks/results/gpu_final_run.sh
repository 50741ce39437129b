#!/usr/bin/env bash
# One device call: build jax_fmha for sm_90a with the carried wheels (nvidia-cutlass for the
# build, flash_attn3_jax + einops as a benchmark peer), run the MLP and shared attention
# GPU tests, the MLP benchmark and the attention harness (all suites). Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD; WHL=${WHL:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHL"/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,driver_version --format=csv
  start=$(date +%s)
  JAX_FMHA_CUDA=ON timeout 200 python3 -m pip install --no-build-isolation --no-deps -q \
    -C build-dir=/tmp/build -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . \
    > /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info())"
  for t in test_mlp.py "test_attention.py test_paged.py"; do
    echo "== pytest -k gpu $t"
    (cd "$REPO/tests" && timeout 120 python3 -m pytest -q -p no:cacheprovider -rf -k gpu $t 2>&1 \
      | grep -E "^FAILED|passed|failed|error" | tail -8)
  done
} 2>&1 | tee "$OUT/tests.txt"
cd /tmp
{
  timeout 90 python3 "$REPO/benchmarks/mlp.py" --backend gpu --out "$OUT/mlp_gpu.json"
  timeout 240 python3 "$REPO/benchmarks/attention.py" --backend gpu --suite all \
    --out /tmp/res/attention_gpu.json
  cp /tmp/res/attention_gpu.json /tmp/res/attention_gpu_prefill.png \
    /tmp/res/attention_gpu_decode.png "$OUT"/
} 2>&1 | tee "$OUT/bench.txt"
