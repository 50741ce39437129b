"""Fused MLP kernels vs what a JAX user writes today, in one run on the same inputs.

  python benchmarks/mlp.py --backend gpu --out benchmarks/results/h200/mlp.json
  python benchmarks/mlp.py --backend cpu --small --out benchmarks/results/cpu-2core/mlp.json
  python benchmarks/tools/results_md.py benchmarks/results/h200   # RESULTS.md from the JSONs

Sizes are Llama-8B-like: 16384 tokens, hidden 4096, intermediate 14336 (--small: 512
tokens). For each op: jax_fmha's kernel; the jnp code a user writes, under jax.jit (XLA
fuses it); and tokamax.layer_norm for the norms where tokamax imports. Each is timed, after
--warmup calls, as the median over 5 batches of the time per call of --reps calls queued
back to back and waited for once (so host dispatch overlaps the device's work). Each call
is its own executable and pays the gap between executables (10-30 us on an H200, varying
between runs), which matters for the 0.07-0.2 ms norms: their kernel-only device time is
measured by benchmarks/tools/mlp_device_time.py under Nsight Compute.
GB/s counts the bytes the op must move (every input read once, every output written
once); "speedup" is the baseline's time over jax_fmha's (> 1: jax_fmha is faster).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from attention import git_revision  # benchmarks/attention.py, beside this script

import jax_fmha
from jax_fmha import reference

EPS = 1e-6


def median_seconds(fn, args, warmup: int, reps: int, batches: int = 5) -> float:
  """Median over `batches` of the time per call of `reps` calls queued back to back and
  waited for once. A single call ending in block_until_ready measures host dispatch and
  synchronization as much as the kernel: for a 0.33 ms GPU kernel its median ranged from
  0.43 to 0.94 ms between runs, enough to flip a ranking."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(batches):
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(reps)])
    times.append((time.perf_counter() - start) / reps)
  return statistics.median(times)


def in_program_seconds(fn, inputs, copies: int, warmup: int, reps: int) -> float:
  """Time per call of `copies` calls of fn inside one jitted program, call k on its own
  copy of the inputs scaled by 1 + k / 64 (exact in every dtype measured; the 1-D weight
  is shared, as in a model's layer it would be that layer's own small vector)."""
  sets = [
    tuple(a if a.ndim == 1 else jax.block_until_ready(a * (1 + k / 64)) for a in inputs)
    for k in range(copies)
  ]
  program = jax.jit(lambda sets: [fn(*s) for s in sets])
  return median_seconds(program, (sets,), warmup, max(2, reps // 4)) / copies


# ---- what a JAX user writes today ------------------------------------------------------


def user_swiglu(gate, up):
  return jax.nn.silu(gate) * up


def user_geglu(gate, up, approximate):
  return jax.nn.gelu(gate, approximate=approximate) * up


def user_swiglu_concat(gate_up):
  return user_swiglu(*jnp.split(gate_up, 2, axis=-1))


def user_swiglu_interleaved(gate_up):
  return user_swiglu(gate_up[..., 0::2], gate_up[..., 1::2])


def tokamax_norms():
  """tokamax's RMSNorm and RMSNorm + residual, or the reason they are not measured."""
  try:
    import tokamax
  except ImportError as e:
    return None, f"tokamax does not import: {e}"
  from absl import flags  # tokamax's dependency

  # tokamax reads its absl flags from sys.argv at first use, where it would meet this
  # script's flags: give it its defaults instead.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])
  norm = functools.partial(tokamax.layer_norm, offset=None, epsilon=EPS, subtract_mean=False)

  def with_residual(x, residual, weight):
    h = x + residual
    return norm(h, weight), h

  return (lambda x, weight: norm(x, weight), with_residual), None


# ---- cases -----------------------------------------------------------------------------


def cases(rng, device, tokens, hidden, intermediate, dtype):
  """(op, bytes moved, {implementation: function}, inputs); jax_fmha is first."""

  def put(shape, scale=1.0, dt=dtype):
    return jax.device_put(np.asarray(rng.standard_normal(shape) * scale, dt), device)

  item = np.dtype(dtype).itemsize
  gate, up = put((tokens, intermediate), 2.0), put((tokens, intermediate))
  concat = jnp.concatenate([gate, up], axis=-1)
  interleaved = jnp.stack([gate, up], axis=-1).reshape(tokens, 2 * intermediate)
  x, residual = put((tokens, hidden)), put((tokens, hidden))
  weight = put((hidden,), dt=np.float32)
  glu_bytes = 3 * tokens * intermediate * item
  norm_bytes = 2 * tokens * hidden * item + hidden * 4

  tokamax_fns, tokamax_missing = tokamax_norms()
  norm_impls = {"jax_fmha": jax_fmha.rms_norm, "xla (jnp)": reference.rms_norm}
  residual_impls = {
    "jax_fmha": jax_fmha.rms_norm_residual,
    "xla (jnp)": reference.rms_norm_residual,
  }
  if tokamax_fns:
    norm_impls["tokamax.layer_norm"], residual_impls["tokamax.layer_norm"] = tokamax_fns
  return [
    ("swiglu", glu_bytes, {"jax_fmha": jax_fmha.swiglu, "xla (jnp)": user_swiglu}, (gate, up)),
    (
      "geglu tanh",
      glu_bytes,
      {"jax_fmha": jax_fmha.geglu, "xla (jnp)": functools.partial(user_geglu, approximate=True)},
      (gate, up),
    ),
    (
      "geglu erf",
      glu_bytes,
      {
        "jax_fmha": functools.partial(jax_fmha.geglu, approximate=False),
        "xla (jnp)": functools.partial(user_geglu, approximate=False),
      },
      (gate, up),
    ),
    (
      "swiglu packed concat",
      glu_bytes,
      {"jax_fmha": jax_fmha.swiglu, "xla (slice + jnp)": user_swiglu_concat},
      (concat,),
    ),
    (
      "swiglu packed interleaved",
      glu_bytes,
      {
        "jax_fmha": functools.partial(jax_fmha.swiglu, packed_layout="interleaved"),
        "xla (slice + jnp)": user_swiglu_interleaved,
      },
      (interleaved,),
    ),
    ("rms_norm", norm_bytes, norm_impls, (x, weight)),
    ("rms_norm_residual", 2 * norm_bytes - hidden * 4, residual_impls, (x, residual, weight)),
  ], tokamax_missing


def max_difference(a, b) -> float:
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(
    float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in leaves
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backend", choices=["cpu", "gpu"], default="gpu")
  parser.add_argument("--small", action="store_true", help="512 tokens instead of 16384")
  parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument(
    "--in-program",
    type=int,
    default=8,
    metavar="N",
    help="calls per program for the in-program timing (0: skip it)",
  )
  parser.add_argument(
    "--ops",
    nargs="+",
    metavar="OP",
    help="only these ops (names as printed, e.g. rms_norm rms_norm_residual)",
  )
  parser.add_argument("--machine", default="", help="what runs it, for the record")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args()

  device = jax.devices(args.backend)[0]
  tokens, hidden, intermediate = (512 if args.small else 16384), 4096, 14336
  dtype = np.dtype(getattr(jnp, args.dtype))
  all_cases, tokamax_missing = cases(
    np.random.default_rng(0), device, tokens, hidden, intermediate, dtype
  )
  print(
    f"{device.device_kind} ({args.backend}), {args.dtype}, tokens {tokens}, hidden "
    f"{hidden}, intermediate {intermediate}" + (f"; {tokamax_missing}" if tokamax_missing else "")
  )
  print(
    f"{'op':27} {'implementation':20} {'time (ms)':>10} {'GB/s':>8} {'speedup':>8}"
    f" {'in program (ms)':>16} {'GB/s':>8} {'speedup':>8}"
  )
  results = []
  for op, nbytes, impls, inputs in all_cases:
    if args.ops and op not in args.ops:
      continue
    ours = None
    for name, fn in impls.items():
      fn = jax.jit(fn)
      seconds = median_seconds(fn, inputs, args.warmup, args.reps)
      row = dict(
        op=op,
        implementation=name,
        time_ms=seconds * 1e3,
        gb_per_s=nbytes / seconds / 1e9,
        bytes=nbytes,
      )
      program = (
        in_program_seconds(fn, inputs, args.in_program, args.warmup, args.reps)
        if args.in_program
        else None
      )
      if program:
        row.update(in_program_ms=program * 1e3, in_program_gb_per_s=nbytes / program / 1e9)
      if ours is None:
        ours = (seconds, program, fn(*inputs))
      else:
        row["jax_fmha_speedup"] = seconds / ours[0]
        if program:
          row["jax_fmha_in_program_speedup"] = program / ours[1]
        row["max_abs_difference_to_jax_fmha"] = max_difference(fn(*inputs), ours[2])
      results.append(row)
      line = f"{op:27} {name:20} {row['time_ms']:10.3f} {row['gb_per_s']:8.1f} "
      line += f"{row['jax_fmha_speedup']:7.2f}x" if "jax_fmha_speedup" in row else " " * 8
      if program:
        line += f" {row['in_program_ms']:16.3f} {row['in_program_gb_per_s']:8.1f} "
        line += (
          f"{row['jax_fmha_in_program_speedup']:7.2f}x"
          if "jax_fmha_in_program_speedup" in row
          else ""
        )
      print(line)

  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    record = dict(
      machine=args.machine or platform.node(),
      device=device.device_kind,
      backend=args.backend,
      dtype=args.dtype,
      tokens=tokens,
      hidden=hidden,
      intermediate=intermediate,
      warmup=args.warmup,
      reps=args.reps,
      in_program_calls=args.in_program,
      jax_version=jax.__version__,
      jax_fmha=jax_fmha.build_info(),
      tokamax=tokamax_missing or "measured",
      git=git_revision(),
      date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      argv=sys.argv,
      results=results,
    )
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
