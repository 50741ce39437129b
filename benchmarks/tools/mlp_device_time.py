"""Device time of the RMSNorm ops, kernel by kernel, without host dispatch.

  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
      python3 benchmarks/tools/mlp_device_time.py > ncu.csv
  python3 benchmarks/tools/mlp_device_time.py --parse ncu.csv

The per-call timing of benchmarks/mlp.py includes each executable's launch gap (10-30 us on
an H200), about as long as a 4096-wide norm of 16384 rows; this measures the kernels alone,
at the card's own clocks, with the profiled range opened around the timed calls only (inputs
and compilation are outside it). Needs cupy (for cudaProfilerStart/Stop).

Calls, in order, 3 each: jax_fmha.rms_norm_residual, XLA's, jax_fmha.rms_norm, XLA's.
jax_fmha's kernels are named rms_norm_kernel; XLA's are the others between them.
"""

import csv
import sys

CALLS = 3
OPS = ("rms_norm_residual", "rms_norm")


def run():
  import cupy
  import jax
  import jax.numpy as jnp

  import jax_fmha
  from jax_fmha import reference

  key = jax.random.PRNGKey(0)
  x, res = (
    jax.random.normal(k, (16384, 4096), jnp.float32).astype(jnp.bfloat16)
    for k in jax.random.split(key)
  )
  w = jnp.ones((4096,), jnp.float32)
  fns = []
  for op in OPS:
    args = (x, res, w) if op == "rms_norm_residual" else (x, w)
    for impl in (getattr(jax_fmha, op), getattr(reference, op)):
      f = jax.jit(impl)
      jax.block_until_ready(f(*args))  # compiled and run once, outside the range
      fns.append((f, args))
  cupy.cuda.profiler.start()
  for f, args in fns:
    for _ in range(CALLS):
      jax.block_until_ready(f(*args))
  cupy.cuda.profiler.stop()


def parse(path):
  with open(path) as f:
    rows = [
      r
      for r in csv.DictReader(line for line in f if line.startswith('"'))
      if r.get("Metric Name") == "gpu__time_duration.sum"
    ]
  groups, current = [], None  # consecutive runs of ours / not ours
  for r in rows:
    ours = "rms_norm_kernel" in r["Kernel Name"]
    if current is None or current[0] != ours:
      current = [ours, 0.0, 0]
      groups.append(current)
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[
      r["Metric Unit"]
    ]
    current[1] += float(r["Metric Value"].replace(",", "")) * scale
    current[2] += 1
  if len(groups) != 2 * len(OPS):
    sys.exit(f"expected {2 * len(OPS)} kernel groups, got {len(groups)}: {groups}")
  for i, op in enumerate(OPS):
    (_, ours_us, ours_n), (_, xla_us, xla_n) = groups[2 * i], groups[2 * i + 1]
    print(
      f"{op:18s} jax_fmha {ours_us / CALLS:7.1f} us/call ({ours_n // CALLS} kernel)   "
      f"xla {xla_us / CALLS:7.1f} us/call ({xla_n // CALLS} kernels)   "
      f"speedup {xla_us / ours_us:.2f}x"
    )


if __name__ == "__main__":
  parse(sys.argv[2]) if sys.argv[1:2] == ["--parse"] else run()
