#!/usr/bin/env bash
# Session-5 device call 5 (final code: pages smaller than the wgmma block go to the portable
# kernel, the loads as in call 2): build; prefill A/B (wgmma, mma.sync, cuDNN), paged prefill;
# the CUDA attention tests on both forward kernels and the -k gpu attention/paged suites;
# memcheck subset (both kernels); the harness paged suite with every peer.
# Carry .whl_fa3 (cutlass, flash_attn3_jax, einops).
source benchmarks/results/device_steps.sh
device_setup .whl_fa3
{
gpu_info
start=$(date +%s)
build_working_tree; echo "build: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log
cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info(), jax_fmha._ffi._ext.cuda_forward_kernel())"
echo "== prefill A/B: wgmma, mma.sync, cuDNN; paged prefill"
timeout 100 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --no-decode 2>&1 | sed -n '/summary:/,$p'
cd "$REPO/tests"
attention_gpu_tests
} 2>&1 | tee "$OUT/call5.txt"
cd /tmp; mkdir -p /tmp/res
for suite in paged; do
  timeout 170 python3 "$REPO/benchmarks/attention.py" --backend gpu --suite $suite \
    --out /tmp/res/attention_gpu_${suite}_h200.json > "$OUT/harness_$suite.txt" 2>&1
  echo "$suite harness rc=$?"; grep -vE "pallas: failed|fa3: failed" "$OUT/harness_$suite.txt" | tail -40
done
cp /tmp/res/*.json /tmp/res/*.png "$OUT"/ 2>/dev/null; ls /tmp/res
