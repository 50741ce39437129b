"""A/B timing of the CUDA attention kernels, in one process (the harness times whole suites
against peers; this compares our own kernels and variants of them).

  python3 benchmarks/tools/kernel_ab.py [--prefill-only | --no-decode | --variant]

Run on the GPU machine with the package installed, from outside the source tree (or with
the repository's jax_fmha not first on sys.path). Prefill (d64/d128/d256, bf16, full and
causal) runs on every forward kernel the device has: on a Hopper build "hopper" (the
default there) and "portable" (through JAX_FMHA_CUDA_FORWARD=portable, read at each
call), with cuDNN on the same inputs. Then paged prefill at pages 16/64/256, and paged
decode (page 16, GQA 32/8, d128) with cuDNN on the same keys as a dense cache and split
counts around the planner's choice, over bfloat16 and FP8 caches. --variant times only our
default kernel (prefill, short sequences, paged and chunked prefill, FP8 prefill with bf16
and FP8 v, and paged decode over bfloat16 and FP8 caches), for comparing a rebuilt kernel
variant against the same lines of an earlier run.

Each number is the median of 5 batches; a batch is 10 prefill (50 decode) calls issued back
to back and one block_until_ready, so host dispatch overlaps device work. The prefill inputs
are 100+ MB, well past L2. TFLOP/s count 4 * B * H * Sq * Sk * D (half when causal); decode
GB/s count the K and V bytes read. The last lines repeat every result under "summary:".
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_fmha


def bench(fn, *args, reps=20):
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  batches = []
  for _ in range(5):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(reps)]
    jax.block_until_ready(outs)
    batches.append((time.perf_counter() - t0) / reps)
  return float(np.median(batches))


def rand(key, shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(jnp.bfloat16)


PREFILL_SHAPES = ((2, 8192, 16, 128), (1, 16384, 16, 128), (4, 4096, 32, 64), (2, 8192, 8, 256))
VARIANT_SHAPES = PREFILL_SHAPES + ((32, 512, 16, 128),)


def forward_kernels():
  """Our forward kernels on this device: the default one, and the portable one if it differs."""
  default = jax_fmha.build_info()["cuda_forward_kernels"][jax.devices()[0].id]
  return [default] + (["portable"] if default != "portable" else [])


def prefill(rows, shapes=PREFILL_SHAPES, peers=True, kernels=None):
  for b, s, h, d in shapes:
    q, k, v = rand(0, (b, s, h, d)), rand(1, (b, s, h, d)), rand(2, (b, s, h, d))
    for causal in (False, True):
      flops = 4 * b * h * s * s * d / (2 if causal else 1)
      ours = jax.jit(lambda q, k, v, c=causal: jax_fmha.attention(q, k, v, causal=c, num_splits=1))
      cudnn = jax.jit(
        lambda q, k, v, c=causal: jax.nn.dot_product_attention(
          q, k, v, is_causal=c, implementation="cudnn"
        )
      )
      line = f"prefill B={b} S={s} H={h} D={d} causal={causal!s:5s}:"
      runs = [(kernel, ours) for kernel in kernels or forward_kernels()]
      for name, fn in runs + [("cudnn", cudnn)] * peers:
        os.environ.pop("JAX_FMHA_CUDA_FORWARD", None)
        if name == "portable":
          os.environ["JAX_FMHA_CUDA_FORWARD"] = "portable"
        try:
          t = bench(fn, q, k, v, reps=10)
          line += f"  {name} {t * 1e3:7.3f} ms {flops / t / 1e12:6.1f} TFLOP/s"
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
          line += f"  {name} failed ({type(e).__name__})"
      os.environ.pop("JAX_FMHA_CUDA_FORWARD", None)
      rows.append(line)
      print(line, flush=True)


def paged_cache(b, keys, hkv, d, page):
  """Random K/V pages [B * keys / page, page, Hkv, D] in a shuffled block table; full lengths."""
  pages = b * keys // page
  kp, vp = rand(1, (pages, page, hkv, d)), rand(2, (pages, page, hkv, d))
  table = jax.random.permutation(jax.random.PRNGKey(3), pages).reshape(b, -1).astype(jnp.int32)
  return kp, vp, table, jnp.full((b,), keys, jnp.int32)


def paged_prefill_lines(rows, name, *, b, sq, sk, hq, hkv, d, causal, page_sizes):
  """Our prefill of sq queries over sk paged keys, one line a page size; TFLOP/s over the
  (query, key) pairs the causal mask (bottom right) leaves, all of them without it."""
  pairs = sq * (sk - sq) + sq * (sq + 1) // 2 if causal else sq * sk
  q = rand(0, (b, sq, hq, d))
  fn = jax.jit(
    lambda q, k, v, t, lens: jax_fmha.attention(
      q, k, v, block_table=t, seq_lens=lens, causal=causal, num_splits=1
    )
  )
  for page in page_sizes:
    t = bench(fn, q, *paged_cache(b, sk, hkv, d, page), reps=10)
    line = (
      f"{name} B={b} Sq={sq} Sk={sk} {hq}/{hkv} D={d} page={page}: {t * 1e3:7.3f} ms "
      f"{4 * b * hq * pairs * d / t / 1e12:6.1f} TFLOP/s"
    )
    rows.append(line)
    print(line, flush=True)


# Paged prefill over pages of 16-256 keys; and the harness's chunked-prefill shape (here
# without split-KV): 512 new queries over 8704 paged keys, GQA 32/8, causal from the bottom right.
PAGED_PREFILL = dict(b=2, sq=8192, sk=8192, hq=16, hkv=16, d=128, causal=False)
CHUNKED_PREFILL = dict(b=4, sq=512, sk=8704, hq=32, hkv=8, d=128, causal=True)


def paged_decode(b, keys, splits=None, cache_dtype=None, cudnn=False):
  """One paged decode line (page 16, GQA 32/8, d128): ours over a bfloat16 cache, or over
  `cache_dtype` (FP8, quantize_kv's scales; GB/s of its bytes); cuDNN on the same keys as a
  dense bfloat16 cache when `cudnn`."""
  hq, hkv, d, page = 32, 8, 128, 16
  q = rand(0, (b, 1, hq, d))
  kp, vp, table, lens = paged_cache(b, keys, hkv, d, page)
  scales = {}
  if cache_dtype is not None:
    kp, scales["k_scale"] = jax_fmha.quantize_kv(kp, cache_dtype)
    vp, scales["v_scale"] = jax_fmha.quantize_kv(vp, cache_dtype)
  kv_bytes = 2 * b * keys * hkv * d * kp.dtype.itemsize
  fn = jax.jit(
    lambda q, k, v, t, lens, scales, n=splits: jax_fmha.attention(
      q, k, v, block_table=t, seq_lens=lens, num_splits=n, **scales
    )
  )
  t = bench(fn, q, kp, vp, table, lens, scales, reps=50)
  line = (
    f"paged decode B={b} keys={keys} page=16 32/8 D=128 {kp.dtype.name} "
    f"splits={splits or 'auto'}: ours {t * 1e6:8.1f} us {kv_bytes / t / 1e9:7.1f} GB/s"
  )
  if cudnn:  # cuDNN on the same keys as a dense [B, keys, Hkv, D] cache
    kd, vd = kp.reshape(b, keys, hkv, d), vp.reshape(b, keys, hkv, d)
    try:
      cd = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
      tc = bench(cd, q, kd, vd, reps=50)
      line += f"  cudnn(dense) {tc * 1e6:8.1f} us {kv_bytes / tc / 1e9:7.1f} GB/s"
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
      line += f"  cudnn failed ({type(e).__name__})"
  return line


def decode(rows):
  cases = [
    (b, keys, None)
    for b, keys in (
      (1, 4096),
      (16, 4096),
      (64, 4096),
      (256, 4096),
      (64, 16384),
      (1, 131072),
      (8, 131072),
    )
  ]
  # Split counts around the planner's choice (33, 4 and 2 on an H200).
  cases += [(1, 131072, n) for n in (16, 66, 132)] + [(8, 131072, n) for n in (5, 8, 33)]
  cases += [(16, 4096, 3)]
  for b, keys, splits in cases:
    line = paged_decode(b, keys, splits, cudnn=splits is None)
    rows.append(line)
    print(line, flush=True)
  # FP8 caches: the planner counts keys, not bytes; split counts around its choice.
  fp8_cases = [(1, 131072, n) for n in (None, 16, 66, 132)]
  fp8_cases += [(8, 32768, n) for n in (None, 2, 4, 8)] + [(64, 4096, n) for n in (None, 2)]
  for b, keys, splits in fp8_cases:
    line = paged_decode(b, keys, splits, cache_dtype=jnp.float8_e4m3fn)
    rows.append(line)
    print(line, flush=True)


def fp8_prefill(rows):
  """FP8 q and k (quantize_fp8's scales) with bf16 v, and with FP8 v, d128 16k."""
  b, s, h, d = 1, 16384, 16, 128
  (q, qs), (k, ks), (v8, vs) = (jax_fmha.quantize_fp8(rand(i, (b, s, h, d))) for i in range(3))
  v = rand(2, (b, s, h, d))
  for causal in (False, True):
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    for name, vv, scales in (("bf16 v", v, {}), ("fp8 v", v8, {"v_scale": vs})):
      fn = jax.jit(
        lambda q, k, v, qs, ks, scales, c=causal: jax_fmha.attention(
          q, k, v, q_scale=qs, k_scale=ks, causal=c, num_splits=1, **scales
        )
      )
      line = f"fp8 prefill B={b} S={s} H={h} D={d} causal={causal!s:5s} {name}:"
      try:
        t = bench(fn, q, k, vv, qs, ks, scales, reps=10)
        line += f" {t * 1e3:7.3f} ms {flops / t / 1e12:6.1f} TFLOP/s"
      except Exception as e:  # noqa: BLE001 - a variant without the mode is reported, not fatal
        line += f" failed ({type(e).__name__})"
      rows.append(line)
      print(line, flush=True)


# --variant's decode lines: the decode suite's shapes over bfloat16 and FP8 caches.
VARIANT_DECODE = ((64, 4096), (8, 32768), (1, 131072))


def variant_decode(rows):
  for cache_dtype in (None, jnp.float8_e4m3fn):
    for b, keys in VARIANT_DECODE:
      line = paged_decode(b, keys, cache_dtype=cache_dtype)
      rows.append(line)
      print(line, flush=True)


if __name__ == "__main__":
  import sys

  if set(sys.argv[1:]) - {"--prefill-only", "--no-decode", "--variant"}:
    sys.exit(__doc__)
  print(jax.devices())
  print(jax_fmha.build_info())
  rows = []
  if "--variant" in sys.argv:
    prefill(rows, VARIANT_SHAPES, peers=False, kernels=forward_kernels()[:1])
    paged_prefill_lines(rows, "paged prefill", page_sizes=(16, 64), **PAGED_PREFILL)
    paged_prefill_lines(rows, "chunked prefill", page_sizes=(16, 64), **CHUNKED_PREFILL)
    fp8_prefill(rows)
    variant_decode(rows)
  else:
    prefill(rows)
  if "--prefill-only" not in sys.argv and "--variant" not in sys.argv:
    paged_prefill_lines(rows, "paged prefill", page_sizes=(16, 64, 256), **PAGED_PREFILL)
    if "--no-decode" not in sys.argv:
      decode(rows)
  print("\n".join(["", "summary:"] + rows))
