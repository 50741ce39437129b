#!/usr/bin/env bash
# Session-6 device call 1: the wgmma kernel takes pages that are a multiple of 64 keys, each
# block's 64-key runs looked up a step ahead of their copies. Build; prefill A/B (wgmma,
# mma.sync, cuDNN) and paged prefill at pages 16/64/256; the CUDA attention tests on both
# forward kernels, the -k gpu attention/paged suites, memcheck (both kernels); the harness
# paged suite (with our dense prefill) and prefill suite with every peer.
# Carry .whl_fa3 (cutlass, flash_attn3_jax, einops).
source benchmarks/results/device_steps.sh
device_setup .whl_fa3
{
start=$(date +%s)
build_and_report
attention_ab_and_tests
echo "elapsed: $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/call1.txt"
cd /tmp; mkdir -p /tmp/res
for suite in paged prefill; do
  timeout 150 python3 "$REPO/benchmarks/attention.py" --backend gpu --suite $suite \
    --out /tmp/res/attention_gpu_${suite}_h200.json > "$OUT/harness_$suite.txt" 2>&1
  echo "$suite harness rc=$?"; grep -vE "pallas: failed|fa3: failed" "$OUT/harness_$suite.txt" | tail -30
done
cp /tmp/res/*.json /tmp/res/*.png "$OUT"/ 2>/dev/null; ls /tmp/res
