#!/usr/bin/env bash
# Session-6 device call 3 (variant, kept as gpu_session6_variant_runs16_smem.patch): the wgmma
# kernel takes pages that are a multiple of 16 keys, their
# page ids staged in shared memory a step ahead (PagedRuns). Build; prefill A/B (wgmma,
# mma.sync, cuDNN) and paged prefill at pages 16/64/256; the CUDA attention tests on both
# kernels, the -k gpu attention/paged suites, memcheck (both kernels); the whole harness.
# Carry .whl_fa3 (cutlass, flash_attn3_jax, einops). Only 8 files come back: the harness
# writes its JSON and the log; the plots stay behind (drawn from the JSON here).
source benchmarks/results/device_steps.sh
device_setup .whl_fa3
{
start=$(date +%s)
build_and_report
attention_ab_and_tests
echo "elapsed: $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/call3.txt"
cd /tmp; mkdir -p /tmp/res3
timeout 300 python3 "$REPO/benchmarks/attention.py" --backend gpu --suite all \
  --out /tmp/res3/attention_gpu_h200.json > "$OUT/harness_all.txt" 2>&1
echo "harness rc=$?"; grep -E "paged/dense|^(met|MISS)" "$OUT/harness_all.txt" | tail -30
cp /tmp/res3/*.json "$OUT"/
