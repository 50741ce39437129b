#!/usr/bin/env bash
# Session-4 device call 2 (RMSNorm, issue 4): the launch-shape sweep outside JAX against
# mlp.cu as committed and against copies with streaming cache hints (stores only; loads
# and stores); benchmarks/mlp.py with its new in-program timing (and tokamax); the
# kernel-only device times under ncu. Carry .whl_mlp (cutlass + tokamax).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site ${WHL:-.whl_mlp}/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
CS_LD='s|reinterpret_cast<uint4\*>(&x)\[i\] = reinterpret_cast<const uint4\*>(p)\[i\];|reinterpret_cast<uint4*>(\&x)[i] = __ldcs(reinterpret_cast<const uint4*>(p) + i);|'
CS_ST='s|reinterpret_cast<uint4\*>(p)\[i\] = reinterpret_cast<const uint4\*>(&x)\[i\];|__stcs(reinterpret_cast<uint4*>(p) + i, reinterpret_cast<const uint4*>(\&x)[i]);|'
{
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
start=$(date +%s)
JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=/tmp/build \
  -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . > /tmp/build.log 2>&1 &
INC=$(python3 -c "import jaxlib, os; print(os.path.join(jaxlib.__path__[0], 'include'))")
sed "$CS_ST" ffi/cuda/mlp.cu > ffi/cuda/mlp_cs_st.cu
sed "$CS_LD; $CS_ST" ffi/cuda/mlp.cu > ffi/cuda/mlp_cs_ldst.cu
for v in mlp mlp_cs_st mlp_cs_ldst; do
  nvcc -O3 -std=c++17 -arch=sm_90a -Iffi -isystem $INC -DMLP_SOURCE="\"cuda/$v.cu\"" \
    benchmarks/results/rms_norm_sweep.cu -o /tmp/sweep_$v &
done
wait; echo "builds: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log
for v in mlp mlp_cs_st mlp_cs_ldst; do echo "== sweep against $v.cu"; /tmp/sweep_$v; done
rm ffi/cuda/mlp_cs_st.cu ffi/cuda/mlp_cs_ldst.cu
} 2>&1 | tee "$OUT/sweep.txt"
cd /tmp
timeout 240 python3 "$REPO/benchmarks/mlp.py" --backend gpu --machine "nvidia-h200 (device tool)" \
  --out "$OUT/mlp_gpu_h200.json" 2>&1 | tee "$OUT/mlp.txt"
{
  timeout 150 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    python3 "$REPO/benchmarks/results/mlp_device_time.py" > /tmp/ncu_mlp.csv 2> /tmp/ncu_mlp.err
  echo "ncu rc=$?"; tail -3 /tmp/ncu_mlp.err
  python3 "$REPO/benchmarks/results/mlp_device_time.py" --parse /tmp/ncu_mlp.csv
} 2>&1 | tee "$OUT/mlp_device_time.txt"
