#!/usr/bin/env bash
# The GPU machine's steps, chosen by arguments, run in the order given. From the repository
# root on the GPU machine:
#
#   bash benchmarks/tools/device_run.sh setup build tests memcheck racecheck synccheck \
#        harness=all mlp ab
#
# Steps:
#   setup[=DIR]      install the wheels carried in DIR (default .whl) into /tmp/site and put it on
#                    PYTHONPATH (the machine has no network); print the GPU. Run it first. Later
#                    invocations on the same machine find /tmp/site and put it on PYTHONPATH.
#   build            pip install the working tree with the CUDA backend (JAX_FMHA_CUDA=ON,
#                    JAX_FMHA_CUDA_ARCHITECTURES, default 90a-real) in build/device, reused by a
#                    warm machine; print the build time and build_info() (with the forward
#                    kernel of each device).
#   tests            every GPU test: tests/test_attention_gpu.py, tests/test_fp8_gpu.py,
#                    tests/test_fp8_attention_gpu.py (FP8 queries on Hopper), the
#                    2-GPU case of tests/test_sharding.py and the -k gpu cases of the shared
#                    suites (attention, paged, MLP).
#   memcheck, racecheck, synccheck
#                    compute-sanitizer with that tool on the attention subset
#                    (tests/test_attention_gpu.py --memcheck: both forward kernels); the
#                    whole report goes to $OUT/<tool>.txt.
#   harness=SUITES   benchmarks/attention.py --backend gpu --suite SUITES (all, or a comma
#                    list such as prefill,paged) -> $OUT/attention.json and its PNGs.
#   mlp              benchmarks/mlp.py --backend gpu -> $OUT/mlp.json.
#   ab[=ARGS]        benchmarks/tools/kernel_ab.py ARGS (e.g. ab=--no-decode): our kernels A/B.
#   ncu-mlp          benchmarks/tools/mlp_device_time.py under Nsight Compute (needs cupy).
#   ncu-attention[=TARGET]
#                    one launch of our attention kernel under Nsight Compute
#                    (benchmarks/tools/ncu_targets.py TARGET: prefill, the default, d128;
#                    prefill_short, B32 x 512; decode or decode_fp8, paged decode over a bf16
#                    or FP8 cache): throughput,
#                    tensor-pipe and memory use, warp stall reasons, scheduler statistics.
#   ncu-source[=TARGET]
#                    the same launch with Nsight Compute's warp-state sampling per SASS
#                    instruction: its source page as CSV -> $OUT/ncu_source_TARGET.csv, and
#                    benchmarks/tools/ncu_source.py's summary (samples by opcode, the
#                    instructions where warps wait most).
#   sweep            build and run benchmarks/tools/rms_norm_sweep.cu against ffi/cuda/mlp.cu.
#
# Everything printed goes to stdout and to $OUT/device_run.log (OUT defaults to
# /tmp/jax_fmha_device_run); the harness and mlp steps write their JSON and PNGs there too
# (with harness=all and mlp: the log, attention.json, five PNGs and mlp.json, 8 files).
# Copy the JSONs and PNGs into benchmarks/results/<device>/ and run
# `python benchmarks/tools/results_md.py benchmarks/results/<device>`.
#
# A machine that allows 10 minutes a command takes the steps over a few commands on the same
# (warm) machine, e.g. `setup build tests memcheck`, then `racecheck synccheck`, then
# `harness=all mlp`; build/device, the installed package and /tmp/site stay between them.
# The results record BENCH_REVISION as their revision when it is set: pass the commit the
# tree was sent at (BENCH_REVISION=$(git rev-parse --short HEAD), written into the command),
# since the machine's copy of .git may not show it.
# Per-step time limits in seconds, from the environment: TEST_TIMEOUT (300),
# SANITIZER_TIMEOUT (300), HARNESS_TIMEOUT (480), STEP_TIMEOUT (240).
set -uo pipefail

REPO=$(pwd)
if [ ! -f "$REPO/benchmarks/tools/device_run.sh" ]; then
  echo "run from the repository root" >&2
  exit 2
fi
OUT=${OUT:-/tmp/jax_fmha_device_run}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
put_site_on_path() {  # the wheels setup installed: peers (flash_attn3_jax, tokamax), CUTLASS
  [[ ":${PYTHONPATH:-}:" == *":/tmp/site:"* ]] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
# A previous invocation's setup on this machine (a harness without its peers compares less).
[ -d /tmp/site ] && put_site_on_path
LOG=$OUT/device_run.log
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-300}
HARNESS_TIMEOUT=${HARNESS_TIMEOUT:-480}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

step_setup() {  # $1: the wheel folder; runs in this shell (exports)
  local wheels=${1:-.whl}
  if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheels"/*.whl || return 1
    put_site_on_path
    echo "wheels from $wheels: $(cd "$wheels" && echo *.whl)"
  else
    echo "no wheels in $wheels: peers that need them (flash_attn3_jax, tokamax) are skipped"
  fi
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
}

report_install() {  # what the installed package says, imported from outside the source tree
  (cd /tmp && python3 - <<'EOF'
import jax
import jax_fmha
print("devices:", jax.devices())
print("build_info:", jax_fmha.build_info())
EOF
  )
}

step_build() {
  local start rc
  start=$(date +%s)
  JAX_FMHA_CUDA=ON JAX_FMHA_CUDA_ARCHITECTURES=${JAX_FMHA_CUDA_ARCHITECTURES:-90a-real} \
    python3 -m pip install --no-build-isolation --no-deps -q -C build-dir=build/device . \
    > /tmp/build.log 2>&1
  rc=$?
  echo "build: rc $rc, $(( $(date +%s) - start )) s (JAX_FMHA_CUDA_ARCHITECTURES=" \
       "${JAX_FMHA_CUDA_ARCHITECTURES:-90a-real}, build dir build/device)"
  tail -n 5 /tmp/build.log
  [ "$rc" -eq 0 ] || return "$rc"
  report_install
}

pytest_summary() {  # pytest args...; prints failures and the summary line
  (cd "$REPO/tests" && timeout "$TEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider -rfE "$@" \
    2>&1 | grep -E "^(FAILED|ERROR)|passed|failed|error|no tests ran" | tail -n 12)
}

step_tests() {
  local rc=0
  echo "== pytest test_attention_gpu.py test_fp8_gpu.py test_fp8_attention_gpu.py"
  pytest_summary test_attention_gpu.py test_fp8_gpu.py test_fp8_attention_gpu.py || rc=1
  echo "== pytest test_sharding.py -k gpus (skipped with fewer than 2 GPUs)"
  pytest_summary -k gpus test_sharding.py || rc=1
  # The shared suites run each case on every device kind (the `device` fixture); -k gpu
  # keeps their GPU cases. float32 attention cases skip there (the GPU kernels take
  # bf16/fp16). The other test files run on the CPU only.
  echo "== pytest -k gpu test_attention.py test_paged.py test_mlp.py"
  pytest_summary -k gpu test_attention.py test_paged.py test_mlp.py || rc=1
  return "$rc"
}

step_sanitizer() {  # $1: memcheck | racecheck | synccheck
  echo "== compute-sanitizer --tool $1, attention subset (both forward kernels)"
  (cd "$REPO/tests" && timeout "$SANITIZER_TIMEOUT" compute-sanitizer --tool "$1" \
    --error-exitcode 3 python3 test_attention_gpu.py --memcheck > "$OUT/$1.txt" 2>&1
   rc=$?
   grep -E "Error|Race|hazard|access at|SUMMARY|done" "$OUT/$1.txt" | head -n 40
   # No summary: the tool or the program died; the last case named is where.
   grep -q SUMMARY "$OUT/$1.txt" || tail -n 15 "$OUT/$1.txt"
   exit "$rc")
}

step_harness() {  # $1: suites
  (cd /tmp && timeout "$HARNESS_TIMEOUT" python3 "$REPO/benchmarks/attention.py" --backend gpu \
    --suite "${1:-all}" --out "$OUT/attention.json" 2>&1 | grep -vE "(pallas|fa3): failed")
}

step_mlp() {
  (cd /tmp && timeout "$STEP_TIMEOUT" python3 "$REPO/benchmarks/mlp.py" --backend gpu \
    --machine "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)" \
    --out "$OUT/mlp.json" 2>&1)
}

step_ab() {  # $@: kernel_ab.py arguments
  # shellcheck disable=SC2068  # the arguments split on purpose (ab=--no-decode)
  (cd /tmp && timeout "$STEP_TIMEOUT" python3 "$REPO/benchmarks/tools/kernel_ab.py" $@ 2>&1)
}

step_ncu_mlp() {
  (cd /tmp && timeout "$STEP_TIMEOUT" ncu --profile-from-start off --clock-control none \
    --metrics gpu__time_duration.sum --csv \
    python3 "$REPO/benchmarks/tools/mlp_device_time.py" > /tmp/ncu_mlp.csv 2> /tmp/ncu_mlp.err)
  local rc=$?
  echo "ncu rc $rc"
  tail -n 3 /tmp/ncu_mlp.err
  python3 "$REPO/benchmarks/tools/mlp_device_time.py" --parse /tmp/ncu_mlp.csv
}

ncu_attention() {  # $1: an ncu_targets.py target (default prefill); the rest: ncu's options
  local target=${1:-prefill}
  shift
  (cd /tmp && timeout "$STEP_TIMEOUT" ncu -k "regex:attention_(forward|decode)_kernel" -c 1 "$@" \
    python3 "$REPO/benchmarks/tools/ncu_targets.py" "$target" 2>&1 | grep -v "^==PROF==")
}

step_ncu_attention() {  # $1: an ncu_targets.py target (prefill, prefill_short, decode, decode_fp8)
  ncu_attention "$1" --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats
}

step_ncu_source() {  # $1: an ncu_targets.py target, as above
  local target=${1:-prefill}
  local report=/tmp/ncu_source_$target csv=$OUT/ncu_source_$target.csv
  ncu_attention "$target" --section SourceCounters --section WarpStateStats -f -o "$report" |
    tail -n 5
  [ -f "$report.ncu-rep" ] || { echo "ncu wrote no report"; return 1; }
  ncu -i "$report.ncu-rep" --page source --csv --print-source sass > "$csv" || return 1
  python3 "$REPO/benchmarks/tools/ncu_source.py" "$csv"
}

step_sweep() {
  local inc
  inc=$(cd /tmp && python3 -c "import jaxlib, os; print(os.path.join(jaxlib.__path__[0], 'include'))")
  nvcc -O3 -std=c++17 -arch=sm_90a -Iffi -isystem "$inc" -DMLP_SOURCE='"cuda/mlp.cu"' \
    benchmarks/tools/rms_norm_sweep.cu -o /tmp/rms_norm_sweep || return 1
  timeout "$STEP_TIMEOUT" /tmp/rms_norm_sweep
}

run_step() {  # step name, value
  case "$1" in
    build) step_build ;;
    tests) step_tests ;;
    memcheck|racecheck|synccheck) step_sanitizer "$1" ;;
    harness) step_harness "$2" ;;
    mlp) step_mlp ;;
    ab) step_ab "$2" ;;
    ncu-mlp) step_ncu_mlp ;;
    ncu-attention) step_ncu_attention "$value" ;;
    ncu-source) step_ncu_source "$value" ;;
    sweep) step_sweep ;;
    *) echo "unknown step $1 (see the head of benchmarks/tools/device_run.sh)"; return 2 ;;
  esac
}

begin=$(date +%s)
summary=()
for arg in "$@"; do
  name=${arg%%=*}
  value=""
  [ "$name" != "$arg" ] && value=${arg#*=}
  start=$(date +%s)
  echo "=== $arg ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  if [ "$name" = setup ]; then  # in this shell: its exports must stay
    step_setup "$value" > /tmp/setup.log 2>&1
    rc=$?
    tee -a "$LOG" < /tmp/setup.log
  else
    run_step "$name" "$value" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  summary+=("$arg: rc $rc, $(( $(date +%s) - start )) s")
done
{
  echo "=== summary ($(( $(date +%s) - begin )) s)"
  printf '%s\n' "${summary[@]}"
} | tee -a "$LOG"
! printf '%s\n' "${summary[@]}" | grep -qv ": rc 0,"
