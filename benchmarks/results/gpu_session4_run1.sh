#!/usr/bin/env bash
# Session-4 device call 1: build the working tree (two warp groups a CTA, half a block
# apart: "pingpong") and two prefill variants from .variants/ (baseline = session-3 HEAD,
# "pipelined" = QK of the next block interleaved with PV of this one, one group) in
# parallel; time each variant's prefill (d64/128/256, A/B in one call), the working tree's
# prefill next to cuDNN, and run the CUDA attention tests on the working tree.
# Carry .whl_min (cutlass) and .variants. To rebuild them: .variants/baseline is ffi/ at
# ebea0a7; .variants/<v> is that tree with gpu_session4_variant_<v>.patch applied
# (patch -p1 -d <copy>), and the working tree's ffi/ was .variants/pingpong.
# Result (gpu_session4_call1_h200.txt): both variants slower at d64/d128, kept neither.
source benchmarks/results/device_steps.sh
device_setup .whl_min
VARIANTS="baseline pipelined"
{
gpu_info
start=$(date +%s)
build_working_tree &
for v in $VARIANTS; do
  ( mkdir -p /tmp/src_$v && tar --exclude=./.whl_min --exclude=./.variants --exclude=./.git -cf - . | tar -xf - -C /tmp/src_$v \
    && rm -rf /tmp/src_$v/ffi && cp -r .variants/$v /tmp/src_$v/ffi \
    && JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q --target /tmp/var_$v \
      -C build-dir=/tmp/build_$v -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real /tmp/src_$v ) \
    > /tmp/build_$v.log 2>&1 &
done
wait; echo "builds: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build*.log
cd /tmp
for v in $VARIANTS; do
  echo "== variant $v"
  PYTHONPATH=/tmp/var_$v:/tmp/site timeout 100 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --variant \
    2>&1 | sed -n '/summary:/,$p'
done
echo "== working tree (pingpong), with cuDNN"
timeout 150 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --prefill-only 2>&1 | sed -n '/summary:/,$p'
echo "== pytest test_attention_gpu.py (working tree)"
(cd "$REPO/tests" && timeout 200 python3 -m pytest -q -p no:cacheprovider -rf -x test_attention_gpu.py 2>&1 | tail -8)
} 2>&1 | tee "$OUT/call1.txt"
