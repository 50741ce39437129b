#!/usr/bin/env bash
# Session-3 device call 1: build jax_fmha (sm_90a) and four prefill variants (K/V pipeline
# depth 3 or 4, lazy softmax rescale) in parallel; time the RMSNorm launch shapes outside
# JAX (rms_norm_sweep.cu, the new kernel and the session-2 one), the norms through JAX
# (benchmarks/mlp.py), profile the norm and prefill kernels with ncu, and time each variant's
# prefill. At most 8 files come back, so logs are concatenated.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site ${WHL:-.whl_min}/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
STAGES='s/static constexpr int kStages = 2;  /static constexpr int kStages = N;  /'
LAZY='s/kRescaleThreshold = 0.f;/kRescaleThreshold = 8.f;/'
declare -A VARIANTS=( [S3]="${STAGES/N/3}" [L8]="$LAZY" [S3L8]="${STAGES/N/3}; $LAZY" [S4L8]="${STAGES/N/4}; $LAZY" )
{
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
start=$(date +%s)
JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=/tmp/build \
  -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . > /tmp/build.log 2>&1 &
for v in "${!VARIANTS[@]}"; do
  ( mkdir -p /tmp/src_$v && tar --exclude=./.whl --exclude=./.whl_min --exclude=./.git -cf - . | tar -xf - -C /tmp/src_$v \
    && sed -i "${VARIANTS[$v]}" /tmp/src_$v/ffi/cuda/attention/kernel_traits.cuh /tmp/src_$v/ffi/cuda/attention/softmax.cuh \
    && grep -hE "int kStages = |kRescaleThreshold =" /tmp/src_$v/ffi/cuda/attention/kernel_traits.cuh /tmp/src_$v/ffi/cuda/attention/softmax.cuh \
    && JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q --target /tmp/var_$v \
      -C build-dir=/tmp/build_$v -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real /tmp/src_$v ) \
    > /tmp/build_$v.log 2>&1 &
done
INC=$(python3 -c "import jaxlib, os; print(os.path.join(jaxlib.__path__[0], 'include'))")
nvcc -O3 -std=c++17 -arch=sm_90a -Iffi -isystem $INC -DMLP_SOURCE='"cuda/mlp.cu"' \
  benchmarks/results/rms_norm_sweep.cu -o /tmp/sweep_new &
nvcc -O3 -std=c++17 -arch=sm_90a -Iffi -isystem $INC -DMLP_SOURCE='"../.bench_old/mlp_lateweights.cu"' \
  benchmarks/results/rms_norm_sweep.cu -o /tmp/sweep_late &
nvcc -O3 -std=c++17 -arch=sm_90a -Iffi -isystem $INC -DOLD_KERNEL -DMLP_SOURCE='"../.bench_old/mlp_old.cu"' \
  benchmarks/results/rms_norm_sweep.cu -o /tmp/sweep_old &
wait; echo "builds: $(( $(date +%s) - start )) s"; tail -2 /tmp/build*.log
} 2>&1 | tee "$OUT/build.txt"
{
  for s in old new late; do echo "== sweep: $s kernel"; timeout 60 /tmp/sweep_$s; done
} 2>&1 | tee "$OUT/sweep.txt"
cd /tmp
timeout 120 python3 "$REPO/benchmarks/mlp.py" --backend gpu --ops rms_norm rms_norm_residual swiglu 2>&1 | tee "$OUT/mlp.txt"
timeout 150 ncu -k regex:"rms_norm|fusion|loop|input_reduce" --section SpeedOfLight --section Occupancy \
  --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
  python3 "$REPO/benchmarks/results/ncu_targets.py" norm > "$OUT/ncu_norm.txt" 2>&1; echo "ncu norm rc=$?"
timeout 150 ncu -k regex:attention_forward --set full python3 "$REPO/benchmarks/results/ncu_targets.py" prefill \
  > "$OUT/ncu_prefill.txt" 2>&1; echo "ncu prefill rc=$?"
{
  echo "== base"; timeout 100 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --variant | sed -n '/summary:/,$p'
  for v in "${!VARIANTS[@]}"; do
    echo "== variant $v: ${VARIANTS[$v]}"
    PYTHONPATH=/tmp/var_$v:/tmp/site timeout 100 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --variant \
      | sed -n '/summary:/,$p'
  done
} 2>&1 | tee "$OUT/variants.txt"
