"""``python -m jax_fmha``: a small Llama-shaped attention workload on whatever device JAX has.

Runs causal GQA prefill of a batch of prompts through jax_fmha's custom call, checks it
against the pure-JAX reference, and prints the backend, the error and the throughput.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_fmha


def _time(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _relative_error(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def prefill(batch: int, seq: int, q_heads: int, kv_heads: int, head_dim: int, dtype, reps: int):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, seq, q_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
  kernel = jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, causal=True))
  hlo = kernel.lower(q, k, v).as_text()
  assert "jax_fmha_attention_fwd" in hlo, "the custom call is missing from the HLO"
  reference = jax.jit(lambda q, k, v: jax_fmha.attention(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=True,
      backend="reference"))
  error = _relative_error(kernel(q, k, v), reference(q, k, v))
  seconds = _time(kernel, q, k, v, reps=reps)
  flops = 4 * batch * q_heads * seq * seq * head_dim / 2  # causal: half the score matrix
  print(f"prefill  B={batch} S={seq} Hq={q_heads} Hkv={kv_heads} D={head_dim} "
        f"{jnp.dtype(dtype).name} causal")
  print(f"  max |err| / max |ref| = {error:.2e}   time {seconds * 1e3:.2f} ms   "
        f"{flops / seconds / 1e12:.3f} TFLOP/s   {batch * seq / seconds:,.0f} tokens/s")
  tolerance = 2e-2 if jnp.dtype(dtype).itemsize == 2 else 1e-4
  return error <= tolerance


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jax_fmha", description=__doc__)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args(argv)

  info = jax_fmha.build_info()
  device = jax.devices()[0]
  print(f"jax_fmha {info['version']} (built: {', '.join(info['backends'])}; jaxlib "
        f"{info['jaxlib_version']}), jax {jax.__version__}")
  print(f"device: {device.platform} ({device.device_kind}); Llama-8B-like heads "
        f"(32 query heads, 8 KV heads, head dim 128)")
  ok = True
  dtypes = [jnp.bfloat16] if device.platform != "cpu" else [jnp.float32, jnp.bfloat16]
  for dtype in dtypes:
    ok &= prefill(args.batch, args.seq, 32, 8, 128, dtype, args.reps)
  print("OK: kernel output matches the reference" if ok else "FAILED: error above tolerance")
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
