"""python -m jax_fmha: a small Llama-shaped attention workload on whatever device JAX has.

1. Causal GQA prefill of a batch of prompts through jax_fmha's custom call.
2. Serving: prompts of different lengths prefilled into a paged KV cache (packed,
   variable-length), then decoded token by token with attention_with_kvcache (cache
   append in place under donation, split-KV chosen by the heuristic).
Each is checked against the pure-JAX reference; the backend, the error and the throughput
are printed. The exit status is 0 when every error is within tolerance, 1 otherwise.
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
  reference = jax.jit(
    lambda q, k, v: jax_fmha.attention(
      q.astype(jnp.float32),
      k.astype(jnp.float32),
      v.astype(jnp.float32),
      causal=True,
      backend="reference",
    )
  )
  error = _relative_error(kernel(q, k, v), reference(q, k, v))
  seconds = _time(kernel, q, k, v, reps=reps)
  flops = 4 * batch * q_heads * seq * seq * head_dim / 2  # causal: half the score matrix
  print(
    f"prefill  B={batch} S={seq} Hq={q_heads} Hkv={kv_heads} D={head_dim} "
    f"{jnp.dtype(dtype).name} causal"
  )
  print(
    f"  max |err| / max |ref| = {error:.2e}   time {seconds * 1e3:.2f} ms   "
    f"{flops / seconds / 1e12:.3f} TFLOP/s   {batch * seq / seconds:,.0f} tokens/s"
  )
  tolerance = 2e-2 if jnp.dtype(dtype).itemsize == 2 else 1e-4
  return error <= tolerance


def paged_decode(prompt_lens: list[int], steps: int, page_size: int, dtype) -> bool:
  q_heads, kv_heads, head_dim = 32, 8, 128
  batch = len(prompt_lens)
  pages_per_seq = -(-(max(prompt_lens) + steps) // page_size)
  num_pages = batch * pages_per_seq
  key = jax.random.key(1)
  new_pages = lambda: jnp.zeros((num_pages, page_size, kv_heads, head_dim), dtype)
  # A shuffled block table: each sequence's pages are scattered over the pool.
  table = jax.random.permutation(key, num_pages).reshape(batch, pages_per_seq)
  table = table.astype(jnp.int32)
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(prompt_lens)]), jnp.int32)

  def step(k_pages, v_pages, cache_seqlens, key, cu_seqlens_q, backend):
    # Prefill: packed [sum(prompt_lens), H, D] with cu_seqlens_q; decode: [B, 1, H, D].
    shape = (sum(prompt_lens),) if cu_seqlens_q is not None else (batch, 1)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, shape + (q_heads, head_dim), dtype)
    k_new = jax.random.normal(kk, shape + (kv_heads, head_dim), dtype)
    v_new = jax.random.normal(kv, shape + (kv_heads, head_dim), dtype)
    return jax_fmha.attention_with_kvcache(
      q,
      k_pages,
      v_pages,
      k_new,
      v_new,
      cache_seqlens=cache_seqlens,
      block_table=table,
      cu_seqlens_q=cu_seqlens_q,
      causal=True,
      backend=backend,
    )

  prefill = jax.jit(
    lambda kp, vp, cs, key, backend: step(kp, vp, cs, key, cu, backend),
    static_argnums=4,
    donate_argnums=(0, 1),
  )
  decode = jax.jit(
    lambda kp, vp, cs, key, backend: step(kp, vp, cs, key, None, backend),
    static_argnums=4,
    donate_argnums=(0, 1),
  )
  worst = 0.0
  caches = {backend: (new_pages(), new_pages()) for backend in ("auto", "reference")}
  lens = jnp.zeros((batch,), jnp.int32)
  keys = jax.random.split(key, steps + 1)
  outs = {}
  for backend in ("auto", "reference"):
    k_pages, v_pages = caches[backend]
    outs[backend], k_pages, v_pages = prefill(k_pages, v_pages, lens, keys[0], backend)
    caches[backend] = (k_pages, v_pages)
  worst = max(worst, _relative_error(outs["auto"], outs["reference"]))
  lens = lens + jnp.asarray(prompt_lens, jnp.int32)
  elapsed = 0.0
  for i in range(steps):
    for backend in ("auto", "reference"):
      k_pages, v_pages = caches[backend]
      start = time.perf_counter()
      outs[backend], k_pages, v_pages = jax.block_until_ready(
        decode(k_pages, v_pages, lens, keys[i + 1], backend)
      )
      if backend == "auto" and i > 0:  # step 0 compiles
        elapsed += time.perf_counter() - start
      caches[backend] = (k_pages, v_pages)
    worst = max(worst, _relative_error(outs["auto"], outs["reference"]))
    lens = lens + 1
  print(
    f"paged decode  prompts {prompt_lens}, page {page_size}, {steps} steps, "
    f"Hq={q_heads} Hkv={kv_heads} D={head_dim} {jnp.dtype(dtype).name}"
  )
  print(
    f"  max |err| / max |ref| over prefill and every step = {worst:.2e}   "
    f"{batch * (steps - 1) / elapsed:,.0f} tokens/s (decode)"
  )
  return worst <= (2e-2 if jnp.dtype(dtype).itemsize == 2 else 1e-4)


def _int_at_least(minimum: int):
  """An argparse type: an integer >= minimum, else a usage error naming both."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < minimum:
      raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value

  return parse


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m jax_fmha",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="example: python -m jax_fmha --batch 4 --seq 2048 --reps 10 --steps 32",
  )
  positive = dict(type=_int_at_least(1), metavar="N")
  parser.add_argument(
    "--batch", default=2, help="prompts in the prefill batch (default: %(default)s)", **positive
  )
  parser.add_argument(
    "--seq", default=1024, help="tokens per prefill prompt (default: %(default)s)", **positive
  )
  parser.add_argument(
    "--reps",
    default=5,
    help="timed prefill runs, after one warm-up; the median is printed (default: %(default)s)",
    **positive,
  )
  parser.add_argument(
    "--steps",
    default=16,
    help="decode steps after the paged prefill of 4 prompts of 37, 300, 129 and 1000 tokens "
    "(default: %(default)s; at least 2: the first step compiles and is not timed)",
    type=_int_at_least(2),
    metavar="N",
  )
  args = parser.parse_args(argv)

  info = jax_fmha.build_info()
  device = jax.devices()[0]
  print(
    f"jax_fmha {info['version']} (built: {', '.join(info['backends'])}; jaxlib "
    f"{info['jaxlib_version']}), jax {jax.__version__}"
  )
  print(
    f"device: {device.platform} ({device.device_kind}); Llama-8B-like heads "
    f"(32 query heads, 8 KV heads, head dim 128)"
  )
  ok = True
  dtypes = [jnp.bfloat16] if device.platform != "cpu" else [jnp.float32, jnp.bfloat16]
  for dtype in dtypes:
    ok &= prefill(args.batch, args.seq, 32, 8, 128, dtype, args.reps)
  ok &= paged_decode([37, 300, 129, 1000], args.steps, 16, dtypes[-1])
  print("OK: kernel output matches the reference" if ok else "FAILED: error above tolerance")
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
