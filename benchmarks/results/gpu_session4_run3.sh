#!/usr/bin/env bash
# Session-4 device call 3 (final code): build; every GPU test suite; compute-sanitizer
# memcheck on the attention subset and on the RMSNorm tests; the launch-shape sweep (the
# shipped launcher line now uses 2 vectors x 256 threads for the residual op); the MLP
# benchmark with the in-program timing and tokamax; kernel-only device times under ncu.
# Carry .whl_mlp (cutlass + tokamax).
source benchmarks/results/device_steps.sh
device_setup .whl_mlp
{
  gpu_info
  start=$(date +%s)
  build_working_tree &
  build_sweep mlp.cu mlp &
  wait; echo "build: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log
  cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info())"
  cd "$REPO/tests"
  for t in test_attention_gpu.py "test_attention.py test_paged.py" test_mlp.py; do
    echo "== pytest $t"
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf \
      $( [ "$t" = test_attention_gpu.py ] || echo "-k gpu") $t 2>&1 | grep -E "^FAILED|passed|failed|error" | tail -8
  done
  echo "== compute-sanitizer memcheck subset (attention)"
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 test_attention_gpu.py --memcheck 2>&1 | tail -4; echo "memcheck rc=${PIPESTATUS[0]}"
  echo "== compute-sanitizer memcheck (RMSNorm kernels: every hidden size, bf16 and f32)"
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q \
    -p no:cacheprovider -k "gpu and rms_norm and (bfloat16 or float32)" test_mlp.py 2>&1 | tail -4
  echo "memcheck rc=${PIPESTATUS[0]}"
  cd "$REPO"
  echo "== sweep"; /tmp/sweep_mlp
} 2>&1 | tee "$OUT/tests.txt"
mlp_benchmarks
