#!/usr/bin/env bash
# Session-6 device call 2 (the code of call 1): build; the whole harness (every suite: prefill,
# gqa, paged, decode, varlen) with every peer in one run, for the issue-5 record.
# Carry .whl_fa3 (cutlass, flash_attn3_jax, einops).
source benchmarks/results/device_steps.sh
device_setup .whl_fa3
{
build_and_report
} 2>&1 | tee "$OUT/call2.txt"
cd /tmp; mkdir -p /tmp/res
timeout 420 python3 "$REPO/benchmarks/attention.py" --backend gpu --suite all \
  --out /tmp/res/attention_gpu_h200.json > "$OUT/harness_all.txt" 2>&1
echo "harness rc=$?"; grep -vE "pallas: failed|fa3: failed" "$OUT/harness_all.txt" | tail -40
cp /tmp/res/*.json /tmp/res/*.png "$OUT"/ 2>/dev/null; ls /tmp/res
