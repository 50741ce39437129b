# Steps shared by the device scripts (gpu_session4_run*.sh), sourced from the repository
# root on the device machine. Each writes to stdout; the callers tee it under $OUT.

# $OUT and $REPO; the wheels carried from this machine (no network there) -> /tmp/site on
# PYTHONPATH. Call it in the script's own shell, not in a pipeline (a subshell).
device_setup() {  # $1: the carried wheel folder
  set -uo pipefail
  OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$1"/*.whl && export PYTHONPATH=/tmp/site || exit 1
  export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
}

gpu_info() { nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; }

# Installs the working tree with the CUDA backend for sm_90a only (about a minute).
build_working_tree() {
  JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=/tmp/build \
    -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . > /tmp/build.log 2>&1
}

# The GPU, the build with its time, and what the installed package reports (the build's
# backends and the forward kernel the device runs). Leaves the shell in /tmp.
build_and_report() {
  gpu_info
  local start; start=$(date +%s)
  build_working_tree; echo "build: $(( $(date +%s) - start )) s"; tail -n 3 /tmp/build.log
  cd /tmp && python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info(), jax_fmha._ffi._ext.cuda_forward_kernel())"
}

# The launch-shape sweep of the RMSNorm kernels, built against ffi/cuda/$1 -> /tmp/sweep_$2.
build_sweep() {
  local inc
  inc=$(python3 -c "import jaxlib, os; print(os.path.join(jaxlib.__path__[0], 'include'))")
  nvcc -O3 -std=c++17 -arch=sm_90a -Iffi -isystem "$inc" -DMLP_SOURCE="\"cuda/$1\"" \
    benchmarks/results/rms_norm_sweep.cu -o "/tmp/sweep_$2"
}

# benchmarks/mlp.py (with tokamax where carried) and the kernel-only times under ncu.
mlp_benchmarks() {
  (cd /tmp && timeout 240 python3 "$REPO/benchmarks/mlp.py" --backend gpu \
    --machine "nvidia-h200 (device tool)" --out "$OUT/mlp_gpu_h200.json" 2>&1 | tee "$OUT/mlp.txt")
  {
    (cd /tmp && timeout 150 ncu --profile-from-start off --clock-control none \
      --metrics gpu__time_duration.sum --csv \
      python3 "$REPO/benchmarks/results/mlp_device_time.py" > /tmp/ncu_mlp.csv 2> /tmp/ncu_mlp.err)
    echo "ncu rc=$?"; tail -3 /tmp/ncu_mlp.err
    python3 "$REPO/benchmarks/results/mlp_device_time.py" --parse /tmp/ncu_mlp.csv
  } 2>&1 | tee "$OUT/mlp_device_time.txt"
}

# The CUDA attention tests: test_attention_gpu.py (both forward kernels), the -k gpu cases of
# the attention and paged suites, and compute-sanitizer memcheck of the attention subset.
# Run from tests/.
attention_gpu_tests() {
  for t in test_attention_gpu.py "test_attention.py test_paged.py"; do
    echo "== pytest $t"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rf \
      $( [ "$t" = test_attention_gpu.py ] || echo "-k gpu") $t 2>&1 | grep -E "^FAILED|passed|failed|error" | tail -8
  done
  echo "== compute-sanitizer memcheck subset (attention, both kernels)"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 test_attention_gpu.py --memcheck 2>&1 | tail -4; echo "memcheck rc=${PIPESTATUS[0]}"
}

# The prefill A/B of both forward kernels and cuDNN, with paged prefill
# (gpu_attention_perf_bench.py), then the CUDA attention tests. Leaves the shell in tests/.
attention_ab_and_tests() {
  echo "== prefill A/B: wgmma, mma.sync, cuDNN; paged prefill"
  timeout 100 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --no-decode 2>&1 | sed -n '/summary:/,$p'
  cd "$REPO/tests"
  attention_gpu_tests
}
