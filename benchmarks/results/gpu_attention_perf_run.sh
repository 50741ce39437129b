#!/usr/bin/env bash
# The device run behind gpu_attention_perf_h100.md / _h200.md: build jax_fmha for sm_90a with
# the carried nvidia-cutlass wheel, run the GPU tests (GPU-only file + the shared suites'
# GPU cases), the timing script, and the compute-sanitizer memcheck subset. Logs go to $OUT.
# VARIANT_SED (optional): a sed expression applied to kernel_traits.cuh after the main run,
# followed by an incremental rebuild and a prefill-only timing of that variant (benchB.txt).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/nvidia_cutlass-*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
build() {
  local start=$(date +%s)
  JAX_FMHA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q \
    -C build-dir=/tmp/build -C cmake.define.JAX_FMHA_CUDA_ARCHITECTURES=90a-real . \
    > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
}
build
cd /tmp
python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info())" | tee -a "$OUT/device.txt"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 150 python3 -m pytest -q -p no:cacheprovider -rf -x "$REPO/tests/test_attention_gpu.py" \
  > "$OUT/pytest_gpu.txt" 2>&1; echo "gpu tests rc=$?"; grep -E "^FAILED|Error" "$OUT/pytest_gpu.txt" | head; tail -1 "$OUT/pytest_gpu.txt"
timeout 200 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"; sed -n '/summary:/,$p' "$OUT/bench.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rf -k gpu \
  "$REPO/tests/test_attention.py" "$REPO/tests/test_paged.py" > "$OUT/pytest_suite_gpu.txt" 2>&1
echo "suite rc=$?"; grep -E "^FAILED" "$OUT/pytest_suite_gpu.txt" | head; tail -1 "$OUT/pytest_suite_gpu.txt"
if [ -z "${SKIP_MEMCHECK:-}" ]; then
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 "$REPO/tests/test_attention_gpu.py" --memcheck > "$OUT/memcheck.txt" 2>&1
  echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.txt"
fi
if [ -n "${VARIANT_SED:-}" ]; then
  cd "$REPO" && sed -i "$VARIANT_SED" ffi/cuda/attention/kernel_traits.cuh && build && cd /tmp
  timeout 120 python3 "$REPO/benchmarks/results/gpu_attention_perf_bench.py" --prefill-only \
    > "$OUT/benchB.txt" 2>&1; echo "variant ($VARIANT_SED) rc=$?"; sed -n '/summary:/,$p' "$OUT/benchB.txt"
fi
