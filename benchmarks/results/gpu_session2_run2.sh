#!/usr/bin/env bash
# Session-2 device call 2: build jax_fmha (sm_90a) with the carried wheels, run every GPU
# test (attention, paged, MLP) and the compute-sanitizer memcheck subset, the example at full
# size in bfloat16, the MLP benchmark (with tokamax) and the attention harness's decode suite
# (the prefill kernel did not change since attention_gpu_h200.json).
# At most 8 files come back: logs are concatenated.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,driver_version --format=csv
  start=$(date +%s)
  JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=/tmp/build \
    -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . > /tmp/build.log 2>&1 \
    || { tail -40 /tmp/build.log; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info())"
  for t in test_attention_gpu.py "test_attention.py test_paged.py" test_mlp.py; do
    echo "== pytest $t"
    (cd "$REPO/tests" && timeout 150 python3 -m pytest -q -p no:cacheprovider -rf \
      $( [ "$t" = test_attention_gpu.py ] || echo "-k gpu") $t 2>&1 | grep -E "^FAILED|passed|failed|error" | tail -8)
  done
  echo "== compute-sanitizer memcheck subset"
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 "$REPO/tests/test_attention_gpu.py" --memcheck 2>&1 | tail -4; echo "memcheck rc=${PIPESTATUS[0]}"
  echo "== example (GPU, bfloat16, full size)"
  timeout 120 python3 "$REPO/examples/llama_decode.py" --dtype bfloat16 2>&1 | tail -6
} 2>&1 | tee "$OUT/tests.txt"
cd /tmp
timeout 120 python3 "$REPO/benchmarks/mlp.py" --backend gpu --out "$OUT/mlp_gpu.json" > "$OUT/mlp.txt" 2>&1
echo "mlp rc=$?"; tail -30 "$OUT/mlp.txt"
mkdir -p /tmp/res
timeout 200 python3 "$REPO/benchmarks/attention.py" --backend gpu --suite decode \
  --out /tmp/res/attention_gpu_decode.json > "$OUT/bench_decode.txt" 2>&1
echo "decode harness rc=$?"; grep -vE "^\[" "$OUT/bench_decode.txt" | tail -5; grep -E "^\[" "$OUT/bench_decode.txt"
cp /tmp/res/attention_gpu_decode.json /tmp/res/attention_gpu_decode_decode.png "$OUT"/ 2>/dev/null
ls /tmp/res
