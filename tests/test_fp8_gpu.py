"""GPU-only tests of FP8 KV caches on the CUDA backend (docs/design/fp8_kv_cache.md): the
decode and portable kernels over float8_e4m3fn / float8_e5m2 K/V, and update_kv_cache
quantizing into an FP8 cache. Skipped when JAX has no GPU.

Attention is compared with the float64 NumPy reference over the dequantized cache (exact
in float64) with the query dtype's tolerance (tests/test_attention_gpu.py's check), slots no
sequence owns hold NaN, and the device memory the outputs land in is filled with NaN first:
an element the kernel skips, or a read outside a sequence, shows. The quantizer is checked
bit for bit against the CPU kernel and ml_dtypes.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

# forward_kernel: every test runs with JAX_FMHA_CUDA_FORWARD unset and =portable; FP8 takes
# the decode and portable kernels either way (the Hopper kernel takes no FP8).
from test_attention_gpu import (  # noqa: F401
  BF16,
  DTYPES,
  check,
  forward_kernel,
  gpu,
  merge_splits,
  randn,
)
from test_fp8 import FORMATS, assert_same_fp8, dequantize_np, fp8_values, paged_fp8, quantize_np

import jax_fmha
from jax_fmha.attention import attention_fwd

import numpy_reference as ref


def _has_cuda() -> bool:
  try:
    return bool(jax.devices("gpu")) and "cuda" in jax_fmha.build_info()["backends"]
  except RuntimeError:
    return False


pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device and the CUDA backend"),
]


def poison_device_memory(nbytes: int = 256 << 20):
  """Fills freed device memory with NaN, where the next outputs are allocated."""
  jax.block_until_ready(
    jnp.full((nbytes // 4,), jnp.nan, jnp.float32, device=gpu_device())
  ).delete()


def gpu_device():
  return jax.devices("gpu")[0]


def run_fp8(q, k, v, k_scale, v_scale, *, kv_layout, window=(-1, -1), num_splits=1, **arrays):
  """The forward primitive on the GPU over FP8 k/v (dense q) with per-head scales [Hkv],
  passed as the custom call takes them: [B, Hkv]; NumPy (out, lse)."""
  poison_device_memory()
  per_sequence = lambda scale: gpu(np.broadcast_to(scale, (q.shape[0],) + scale.shape).copy())
  out, lse = attention_fwd(
    gpu(q),
    gpu(k),
    gpu(v),
    k_scale=per_sequence(k_scale),
    v_scale=per_sequence(v_scale),
    scale=1.0 / math.sqrt(q.shape[-1]),
    softcap=0.0,
    window=window,
    kv_layout=kv_layout,
    num_splits=num_splits,
    max_seqlen_q=q.shape[1],
    **{name: gpu(x) for name, x in arrays.items()},
  )
  return np.asarray(out), np.asarray(lse)


def check_splits(out, lse, ro, rl, dtype, num_splits, what):
  if num_splits > 1:
    assert out.dtype == np.float32 and out.shape[0] == num_splits, what
    out, lse = merge_splits(out, lse)
  else:
    assert out.dtype == dtype, what
  check(out, lse, ro, rl, dtype, what)


# ---------------------------------------------------------------------------------------
# Decode (the decode kernel) and chunked prefill (the portable kernel)
# ---------------------------------------------------------------------------------------

# Lengths that are not multiples of a 16-key block, 0 and 1 included.
DECODE_LENS = [0, 1, 15, 17, 129, 700]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 1)])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_decode_paged(rng, fmt, dtype, d, hq, hkv, page_size):
  k, v, table, lens, k_scale, v_scale, _, _ = paged_fp8(rng, DECODE_LENS, page_size, hkv, d, fmt)
  q = randn(rng, (len(DECODE_LENS), 1, hq, d), dtype)
  out, lse = run_fp8(q, k, v, k_scale, v_scale, kv_layout="paged", seq_lens=lens, block_table=table)
  ro, rl = ref.paged(q, dequantize_np(k, k_scale), dequantize_np(v, v_scale), table, lens)
  check_splits(out, lse, ro, rl, dtype, 1, f"{fmt} d{d} {hq}/{hkv} page {page_size}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_decode_contiguous_cache(rng, fmt, dtype, d):
  """A contiguous cache [B, S_max, Hkv, D] with seq_lens; NaN past each sequence. d96 runs
  at the compiled d128, zero-padded."""
  lens = np.array([0, 1, 33, 300], np.int32)
  owned = np.arange(320)[None, :] < lens[:, None]
  k, k_scale, _ = fp8_values(rng, (4, 320, 2, d), fmt, owned)
  v, v_scale, _ = fp8_values(rng, (4, 320, 2, d), fmt, owned)
  q = randn(rng, (4, 1, 16, d), dtype)
  out, lse = run_fp8(q, k, v, k_scale, v_scale, kv_layout="cache", seq_lens=lens)
  ro, rl = ref.kv_cache(q, dequantize_np(k, k_scale), dequantize_np(v, v_scale), lens)
  check_splits(out, lse, ro, rl, dtype, 1, f"{fmt} d{d}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("num_splits", [3, 8])
def test_decode_split_kv(rng, fmt, dtype, num_splits):
  """Forced splits: float32 partial outputs that already hold v_scale, and LSEs with
  k_scale, merged as any others."""
  k, v, table, lens, k_scale, v_scale, _, _ = paged_fp8(rng, [5000, 1, 0, 2049], 16, 8, 128, fmt)
  q = randn(rng, (4, 1, 32, 128), dtype)
  args = dict(kv_layout="paged", seq_lens=lens, block_table=table)
  out, lse = run_fp8(q, k, v, k_scale, v_scale, num_splits=num_splits, **args)
  ro, rl = ref.paged(q, dequantize_np(k, k_scale), dequantize_np(v, v_scale), table, lens)
  check_splits(out, lse, ro, rl, dtype, num_splits, f"{fmt} {num_splits} splits")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("page_size,num_splits", [(16, 1), (64, 1), (16, 3), (7, 1)])
def test_chunked_prefill_paged(rng, fmt, dtype, d, page_size, num_splits):
  """Sq = 100 causal queries, GQA 8/2 (400 packed rows per KV head: the portable kernel,
  on Hopper too), over paged FP8 keys."""
  lens = [100, 357, 1000]
  k, v, table, seq_lens, k_scale, v_scale, _, _ = paged_fp8(rng, lens, page_size, 2, d, fmt)
  q = randn(rng, (len(lens), 100, 8, d), dtype)
  window = (-1, 0)
  out, lse = run_fp8(
    q,
    k,
    v,
    k_scale,
    v_scale,
    kv_layout="paged",
    window=window,
    num_splits=num_splits,
    seq_lens=seq_lens,
    block_table=table,
  )
  ro, rl = ref.paged(
    q, dequantize_np(k, k_scale), dequantize_np(v, v_scale), table, seq_lens, window=window
  )
  check_splits(out, lse, ro, rl, dtype, num_splits, f"{fmt} d{d} page {page_size}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_special_values_and_large_queries(rng, fmt):
  """bfloat16 queries far beyond float16's range (the kernel rescales them into fp16), keys
  with the format's largest and subnormal values, and a NaN key that spoils its sequence's
  outputs only."""
  lens = [40, 40]
  k, v, table, seq_lens, k_scale, v_scale, _, _ = paged_fp8(rng, lens, 16, 1, 128, fmt)
  big = ml_dtypes.finfo(k.dtype).max
  tiny = np.uint8(1).view(k.dtype)  # the smallest subnormal
  k[table[0, 0], 0, 0, :4] = [big, -big, tiny, -tiny]
  v[table[0, 0], 1, 0, :2] = [big, tiny]
  q = randn(rng, (2, 1, 4, 128), BF16) * np.asarray(1e30, BF16)
  q[0, 0, 1] *= np.asarray(1e-35, BF16)  # another row's magnitude, 1e-5
  k[table[1, 1], 3, 0, 7] = np.nan
  out, lse = run_fp8(
    q, k, v, k_scale, v_scale, kv_layout="paged", seq_lens=seq_lens, block_table=table
  )
  ro, rl = ref.paged(q, dequantize_np(k, k_scale), dequantize_np(v, v_scale), table, seq_lens)
  assert np.isnan(out[1]).all()
  check(out[:1], lse[:1], ro[:1], rl[:1], BF16, fmt)


def test_public_api_decode_step_matches_the_cpu(rng):
  """attention_with_kvcache on an FP8 paged cache (quantizing the new token into the page
  that holds position seq_lens[b], then attending with a heuristic split) on the GPU and on
  the CPU."""
  fmt = "float8_e4m3fn"
  lens = [3000, 1, 77]
  k, v, table, seq_lens, k_scale, v_scale, _, _ = paged_fp8(rng, lens, 16, 8, 128, fmt)
  q = randn(rng, (3, 1, 32, 128), BF16)
  k_new, v_new = randn(rng, (3, 1, 8, 128), BF16), randn(rng, (3, 1, 8, 128), BF16)

  def step(device):
    args = [jax.device_put(x, device) for x in (q, k, v, k_new, v_new, seq_lens, table)]
    scales = [jax.device_put(x, device) for x in (k_scale, v_scale)]
    out, k_cache, v_cache = jax.jit(
      lambda q, k, v, kn, vn, lens, table, ks, vs: jax_fmha.attention_with_kvcache(
        q, k, v, kn, vn, cache_seqlens=lens, block_table=table, k_scale=ks, v_scale=vs
      )
    )(*args, *scales)
    return np.asarray(out), np.asarray(k_cache), np.asarray(v_cache)

  out, k_cache, v_cache = step(gpu_device())
  cpu_out, cpu_k, cpu_v = step(jax.devices("cpu")[0])
  assert_same_fp8(k_cache, cpu_k, "k cache")
  assert_same_fp8(v_cache, cpu_v, "v cache")
  scale = 1 + np.abs(cpu_out.astype(np.float64)).max()
  err = np.abs(out.astype(np.float64) - cpu_out.astype(np.float64)).max()
  assert err <= 1.5e-2 * scale, err


def test_lowering_holds_the_custom_calls():
  """Both FP8 custom calls lower for the GPU (no trace-time refusal)."""
  k, v, table, lens, k_scale, v_scale, _, _ = paged_fp8(
    np.random.default_rng(0), [20], 16, 2, 64, "float8_e5m2"
  )
  q = np.zeros((1, 1, 8, 64), BF16)
  new = np.zeros((1, 1, 2, 64), BF16)
  step = jax.jit(
    lambda q, k, v, new, lens, table, ks, vs: jax_fmha.attention_with_kvcache(
      q, k, v, new, new, cache_seqlens=lens, block_table=table, k_scale=ks, v_scale=vs
    )
  )
  args = [gpu(x) for x in (q, k, v, new, lens, table, k_scale, v_scale)]
  hlo = step.lower(*args).as_text()
  assert "jax_fmha_attention_fwd" in hlo and "jax_fmha_update_kv_cache" in hlo


# ---------------------------------------------------------------------------------------
# update_kv_cache into an FP8 cache
# ---------------------------------------------------------------------------------------


def quantizer_inputs(rng, fmt, n):
  """n float32 values: every FP8 value and midpoint (ties) times the scale, their
  neighbours, saturating values, infinities, NaN of both signs, zeros, random bits."""
  codes = np.arange(256, dtype=np.uint8).view(np.dtype(jnp.dtype(fmt))).astype(np.float32)
  codes = np.sort(codes[np.isfinite(codes)])
  mids = (codes[1:] + codes[:-1]) / 2
  values = np.concatenate(
    [
      codes,
      mids,
      np.nextafter(mids, np.float32(np.inf)),
      np.nextafter(mids, np.float32(-np.inf)),
      [np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30],
      rng.standard_normal(n) * 1000,
      rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32),
    ]
  ).astype(np.float32)
  return np.resize(values, n)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("new_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("paged", [True, False])
def test_update_quantizes_like_the_cpu(rng, fmt, new_dtype, paged):
  """Bytes written on the GPU equal the CPU kernel's (NaN codes included) and ml_dtypes'
  rounding of the same float32 products (saturating; NaN matches any NaN). k's scales are
  per KV head, v's per sequence and KV head."""
  hkv, d, b, t = 4, 64, 3, 50
  new_dtype = np.dtype(jnp.dtype(new_dtype))
  scale = np.array([1.0, 0.37, 3.0e-3, 250.0], np.float32)
  v_scale = rng.uniform(0.01, 10.0, (b, hkv)).astype(np.float32)
  values = quantizer_inputs(rng, fmt, 2 * b * t * hkv * d)
  with np.errstate(over="ignore"):
    k_new = (values[: b * t * hkv * d].reshape(b, t, hkv, d) * scale[:, None]).astype(new_dtype)
    v_new = values[b * t * hkv * d :].reshape(b, t, hkv, d).astype(new_dtype)
  lens = np.array([0, 7, 100], np.int32)
  fp8 = np.dtype(jnp.dtype(fmt))
  if paged:
    page = 16
    table = np.arange(b * 10, dtype=np.int32).reshape(b, 10)[:, ::-1].copy()
    cache = np.zeros((b * 10, page, hkv, d), fp8)
  else:
    table = None
    cache = np.zeros((b, 160, hkv, d), fp8)

  def update(device):
    put = lambda x: None if x is None else jax.device_put(x, device)
    kc, vc = jax_fmha.update_kv_cache(
      put(cache),
      put(cache),
      put(k_new),
      put(v_new),
      put(table),
      put(lens),
      k_scale=put(scale),
      v_scale=put(v_scale),
    )
    return np.asarray(kc), np.asarray(vc)

  k_gpu, v_gpu = update(gpu_device())
  k_cpu, v_cpu = update(jax.devices("cpu")[0])
  scales = {"k": np.broadcast_to(scale, (b, hkv)), "v": v_scale}
  for new, got, cpu, what in ((k_new, k_gpu, k_cpu, "k"), (v_new, v_gpu, v_cpu, "v")):
    np.testing.assert_array_equal(got.view(np.uint8), cpu.view(np.uint8), err_msg=what)
    for s in range(b):
      pos = lens[s] + np.arange(t)
      rows = got[table[s, pos // page], pos % page] if paged else got[s, pos]
      assert_same_fp8(rows, quantize_np(new[s], scales[what][s], fmt), f"{what}, sequence {s}")
