#!/usr/bin/env bash
# Session-6 device call 4: pages that are a multiple of 64 keys keep their register runs
# (call 1); other multiples of 16 load as 16-key runs with page ids staged in shared
# memory (call 3's mechanism). Build; prefill A/B and paged prefill at pages 16/64/256; the
# CUDA attention tests on both kernels, the -k gpu suites, memcheck; the harness paged suite.
# Carry .whl_fa3 (cutlass, flash_attn3_jax, einops).
source benchmarks/results/device_steps.sh
device_setup .whl_fa3
{
start=$(date +%s)
build_and_report
attention_ab_and_tests
echo "elapsed: $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/call4.txt"
cd /tmp; mkdir -p /tmp/res4
timeout 120 python3 "$REPO/benchmarks/attention.py" --backend gpu --suite paged \
  --out /tmp/res4/attention_gpu_paged_h200.json > "$OUT/harness_paged.txt" 2>&1
echo "harness rc=$?"; grep -E "paged/dense|^(met|MISS)" "$OUT/harness_paged.txt" | tail -30
cp /tmp/res4/*.json "$OUT"/
