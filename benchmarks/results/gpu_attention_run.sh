#!/usr/bin/env bash
# The device run behind gpu_attention_tests_h100.txt: install the carried nvidia-cutlass
# wheel, build jax_fmha for the device's architecture, run the GPU attention tests, a
# compute-sanitizer memcheck subset, and the quick prefill timing. Run from the repo root
# on the GPU machine; logs go to $OUT (or ./gpu_logs).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
start=$(date +%s)
JAX_FMHA_CUDA=ON JAX_FMHA_CUDA_ARCHITECTURES=${ARCHS:-90a-real} \
  python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
REPO=$PWD OUT=$(realpath "$OUT")
cd /tmp  # import the installed package, not the source tree
python3 -c "import jax, jax_fmha; print(jax.devices(), jax_fmha.build_info())" | tee -a "$OUT/device.txt"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -rf --durations=5 \
  "$REPO/tests/test_attention_gpu.py" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -40
# The shared attention / paged suites, their GPU-parametrized cases only.
timeout ${SUITE_TIMEOUT:-180} python3 -m pytest -q -p no:cacheprovider -rf -k gpu \
  "$REPO/tests/test_attention.py" "$REPO/tests/test_paged.py" > "$OUT/pytest_suite_gpu.txt" 2>&1
echo "suite rc=$?"; grep -E "^FAILED" "$OUT/pytest_suite_gpu.txt" | head -20; tail -2 "$OUT/pytest_suite_gpu.txt"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 "$REPO/tests/test_attention_gpu.py" --memcheck > "$OUT/memcheck.txt" 2>&1
echo "memcheck rc=$?"; tail -5 "$OUT/memcheck.txt"
timeout 150 python3 "$REPO/tests/test_attention_gpu.py" --time 2>&1 | tee "$OUT/timing.txt"
