#!/usr/bin/env bash
# Session-5 device call 3 (final kernel code): build; the CUDA attention tests on both
# forward kernels and the -k gpu attention/paged suites; memcheck subset (both kernels);
# prefill A/B (wgmma, mma.sync, cuDNN; d64 runs mma.sync in both rows: the dispatcher keeps
# d64 portable); the harness's prefill suite with every peer (cuDNN, XLA, Pallas,
# flash_attn3_jax). Carry .whl_fa3 (cutlass, flash_attn3_jax, einops).
source benchmarks/results/device_steps.sh
device_setup .whl_fa3
{
gpu_info
start=$(date +%s)
build_working_tree; echo "build: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log
cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info(), jax_fmha._ffi._ext.cuda_forward_kernel())"
cd "$REPO/tests"
attention_gpu_tests
cd /tmp
echo "== prefill A/B: wgmma, mma.sync, cuDNN"
timeout 100 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --prefill-only 2>&1 | sed -n '/summary:/,$p'
} 2>&1 | tee "$OUT/call3.txt"
mkdir -p /tmp/res
timeout 220 python3 "$REPO/benchmarks/attention.py" --backend gpu --suite prefill \
  --out /tmp/res/attention_gpu_prefill_h200.json > "$OUT/harness_prefill.txt" 2>&1
echo "prefill harness rc=$?"; tail -50 "$OUT/harness_prefill.txt"
cp /tmp/res/*.json /tmp/res/*.png "$OUT"/ 2>/dev/null; ls /tmp/res
