#!/usr/bin/env bash
# Session-4 device call 2 (RMSNorm, issue 4): the launch-shape sweep outside JAX against
# mlp.cu as committed and against copies with streaming cache hints (stores only; loads
# and stores); benchmarks/mlp.py with its new in-program timing (and tokamax); the
# kernel-only device times under ncu. Carry .whl_mlp (cutlass + tokamax).
source benchmarks/results/device_steps.sh
CS_LD='s|reinterpret_cast<uint4\*>(&x)\[i\] = reinterpret_cast<const uint4\*>(p)\[i\];|reinterpret_cast<uint4*>(\&x)[i] = __ldcs(reinterpret_cast<const uint4*>(p) + i);|'
CS_ST='s|reinterpret_cast<uint4\*>(p)\[i\] = reinterpret_cast<const uint4\*>(&x)\[i\];|__stcs(reinterpret_cast<uint4*>(p) + i, reinterpret_cast<const uint4*>(\&x)[i]);|'
device_setup .whl_mlp
{
  gpu_info
  start=$(date +%s)
  build_working_tree &
  sed "$CS_ST" ffi/cuda/mlp.cu > ffi/cuda/mlp_cs_st.cu
  sed "$CS_LD; $CS_ST" ffi/cuda/mlp.cu > ffi/cuda/mlp_cs_ldst.cu
  for v in mlp mlp_cs_st mlp_cs_ldst; do build_sweep $v.cu $v & done
  wait; echo "builds: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log
  for v in mlp mlp_cs_st mlp_cs_ldst; do echo "== sweep against $v.cu"; /tmp/sweep_$v; done
  rm ffi/cuda/mlp_cs_st.cu ffi/cuda/mlp_cs_ldst.cu
} 2>&1 | tee "$OUT/sweep.txt"
mlp_benchmarks
