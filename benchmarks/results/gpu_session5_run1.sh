#!/usr/bin/env bash
# Session-5 device call 1: the wgmma (sm_90a) forward kernel. Build the working tree and a
# variant with 3 K/V stages (.variants/stages3: HopperTraits::kStages 3 up to d192) in
# parallel; the CUDA attention tests on both forward kernels (wgmma default, mma.sync via
# JAX_FMHA_CUDA_FORWARD=portable); prefill timings of both kernels next to cuDNN; the
# variant's prefill; compute-sanitizer memcheck of the attention subset (both kernels).
# Carry .whl_min (cutlass) and .variants/stages3.
source benchmarks/results/device_steps.sh
device_setup .whl_min
{
gpu_info
start=$(date +%s)
build_working_tree &
( mkdir -p /tmp/src_v && tar --exclude=./.whl_min --exclude=./.variants --exclude=./.git -cf - . | tar -xf - -C /tmp/src_v \
  && rm -rf /tmp/src_v/ffi && cp -r .variants/stages3 /tmp/src_v/ffi \
  && JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q --target /tmp/var_v \
    -C build-dir=/tmp/build_v -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real /tmp/src_v ) \
  > /tmp/build_v.log 2>&1 &
wait; echo "builds: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log /tmp/build_v.log
cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info(), jax_fmha._ffi._ext.cuda_forward_kernel())"
echo "== pytest test_attention_gpu.py (both forward kernels)"
(cd "$REPO/tests" && timeout 150 python3 -m pytest -q -p no:cacheprovider -rf test_attention_gpu.py 2>&1 | grep -E "^FAILED|^E  |passed|failed|error" | head -40)
echo "== prefill: wgmma, mma.sync, cuDNN"
timeout 120 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --prefill-only 2>&1 | sed -n '/summary:/,$p'
echo "== variant stages3 (wgmma kernel, 3 stages up to d192)"
PYTHONPATH=/tmp/var_v:/tmp/site timeout 90 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --variant 2>&1 | sed -n '/summary:/,$p'
echo "== compute-sanitizer memcheck subset (attention, both kernels)"
(cd "$REPO/tests" && timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 test_attention_gpu.py --memcheck 2>&1 | tail -5; echo "memcheck rc=${PIPESTATUS[0]}")
} 2>&1 | tee "$OUT/call1.txt"
