#!/usr/bin/env bash
# Session-5 device call 2: the wgmma forward kernel, corrected (swizzle on byte addresses)
# and with its products overlapped with the softmax (V one block behind K). Build; the CUDA
# attention tests on both forward kernels; prefill of both kernels next to cuDNN, paged
# prefill, decode; compute-sanitizer memcheck of the attention subset (both kernels).
# Carry .whl_min (cutlass).
source benchmarks/results/device_steps.sh
device_setup .whl_min
{
gpu_info
start=$(date +%s)
build_working_tree; echo "build: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log
cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info(), jax_fmha._ffi._ext.cuda_forward_kernel())"
echo "== pytest test_attention_gpu.py (both forward kernels)"
(cd "$REPO/tests" && timeout 150 python3 -m pytest -q -p no:cacheprovider -rf test_attention_gpu.py 2>&1 | grep -E "^FAILED|passed|failed|error" | head -30)
echo "== prefill: wgmma, mma.sync, cuDNN; paged prefill; decode"
timeout 150 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" 2>&1 | sed -n '/summary:/,$p'
echo "== compute-sanitizer memcheck subset (attention, both kernels)"
(cd "$REPO/tests" && timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 test_attention_gpu.py --memcheck 2>&1 | tail -5; echo "memcheck rc=${PIPESTATUS[0]}")
} 2>&1 | tee "$OUT/call2.txt"
