"""FP8 KV caches (float8_e4m3fn, float8_e5m2) with per-KV-head scales, on the CPU backend
(the CUDA kernels: tests/test_fp8_gpu.py).

Attention over an FP8 cache is compared with the float64 NumPy reference over the
dequantized keys and values (FP8 values times their head's scale, exact in float64), with
the query dtype's tolerance: the kernel's own error, as for any cache. The error against
the unquantized values (what FP8 storage costs) is bounded and reported apart. Cache
slots no sequence owns hold NaN, so a read outside a sequence shows in the output.

The quantizer (update_kv_cache into an FP8 cache, quantize_kv) is checked bit for bit
against ml_dtypes' rounding of the same float32 products, NaN, infinities and saturation
included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_fmha

import numpy_reference as ref
from conftest import FLOAT_DTYPES, assert_attention_close, assert_close, randn

# Every test runs on the CPU backend, also on a GPU machine; tests/test_fp8_gpu.py covers the
# CUDA kernels.
pytestmark = pytest.mark.usefixtures("on_cpu")

FP8 = {"float8_e4m3fn": np.dtype(jnp.float8_e4m3fn), "float8_e5m2": np.dtype(jnp.float8_e5m2)}
FORMATS = list(FP8)
# Error against the unquantized cache, ||out - unquantized|| / ||unquantized|| (inputs
# standard normal times 0.5-4 per head, d 64-128, up to 700 keys): measured 0.03-0.064
# (e4m3fn) and 0.06-0.15 (e5m2) over these tests (max-norm: 0.03-0.11 and 0.08-0.32).
UNQUANTIZED_RMS = {"float8_e4m3fn": 0.1, "float8_e5m2": 0.25}


def fp8_max(fmt) -> float:
  return float(ml_dtypes.finfo(FP8[fmt]).max)


def quantize_np(x, scale, fmt):
  """What the quantizer must produce, without jax_fmha: x [..., Hkv, D] times the float32
  reciprocal of scale [Hkv], in float32, clipped to the format's range and rounded (to
  nearest even) by ml_dtypes. NaN stays NaN."""
  inv = (np.float32(1) / np.asarray(scale, np.float32))[:, None]
  with np.errstate(invalid="ignore"):
    scaled = np.asarray(x, np.float32) * inv
  return np.clip(scaled, -fp8_max(fmt), fp8_max(fmt)).astype(FP8[fmt])


def assert_same_fp8(actual, expected, what="cache"):
  """Bit for bit, except that NaNs match any NaN (XLA's copies of e5m2 arrays do not keep
  NaN payloads)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
  nan = np.isnan(expected.astype(np.float32))
  np.testing.assert_array_equal(np.isnan(actual.astype(np.float32)), nan, err_msg=what)
  np.testing.assert_array_equal(actual.view(np.uint8)[~nan], expected.view(np.uint8)[~nan], what)


def dequantize_np(x_fp8, scale):
  return np.asarray(x_fp8).astype(np.float64) * np.asarray(scale, np.float64)[:, None]


def fp8_values(rng, shape, fmt, owned=None):
  """Standard-normal values of `shape` [..., Hkv, D] (a different magnitude per head), their
  FP8 quantization with amax scales per head, and the scales. Where `owned` (the leading
  axes) is False the FP8 array holds NaN: slots no sequence may read.

  Returns (x_fp8, scale float32 [Hkv], x float64)."""
  hkv = shape[-2]
  x = rng.standard_normal(shape) * rng.uniform(0.5, 4.0, hkv)[:, None]
  scale = (np.abs(x).reshape(-1, hkv, shape[-1]).max(axis=(0, 2)) / fp8_max(fmt)).astype(np.float32)
  x_fp8 = quantize_np(x, scale, fmt)
  if owned is not None:
    x_fp8[~owned] = np.nan
  return x_fp8, scale, x


def paged_fp8(rng, lens, page_size, hkv, d, fmt, spare_pages=2):
  """FP8 K/V pages holding sequences of `lens` keys through a permuted block table (-1
  past each sequence's last page), NaN in every slot no sequence owns.

  Returns (k, v, table, seq_lens, k_scale, v_scale, k_true, v_true)."""
  pages_per_seq = max(1, max(-(-n // page_size) for n in lens))
  num_pages = len(lens) * pages_per_seq + spare_pages
  table = rng.permutation(num_pages)[: len(lens) * pages_per_seq].reshape(len(lens), -1)
  table = table.astype(np.int32)
  owned = np.zeros((num_pages, page_size), bool)
  for b, n in enumerate(lens):
    for j in range(n):
      owned[table[b, j // page_size], j % page_size] = True
    table[b, -(-n // page_size) :] = -1
  shape = (num_pages, page_size, hkv, d)
  k, k_scale, k_true = fp8_values(rng, shape, fmt, owned)
  v, v_scale, v_true = fp8_values(rng, shape, fmt, owned)
  return k, v, table, np.asarray(lens, np.int32), k_scale, v_scale, k_true, v_true


def assert_near_unquantized(out, unquantized, fmt):
  """The FP8 cache's result against the unquantized one (the cost of FP8 storage), as the
  relative RMS error ||out - unquantized|| / ||unquantized||."""
  out, unquantized = np.asarray(out, np.float64), np.asarray(unquantized, np.float64)
  rms = np.linalg.norm(out - unquantized) / np.linalg.norm(unquantized)
  worst = np.abs(out - unquantized).max() / np.abs(unquantized).max()
  print(f"{fmt}: error against the unquantized cache: relative RMS {rms:.4f}, max {worst:.4f}")
  assert rms <= UNQUANTIZED_RMS[fmt], f"{fmt}: relative RMS error {rms:.4f} (max {worst:.4f})"


# ---------------------------------------------------------------------------------------
# Attention over FP8 caches
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("page_size", [1, 16, 7])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_paged_chunked_prefill(rng, fmt, page_size, dtype):
  """Sq = 3 causal queries (chunked prefill) over paged FP8 keys, GQA 8/2."""
  dtype = FLOAT_DTYPES[dtype]
  lens = [0, 1, page_size, page_size + 1, 3 * page_size + 5, 40]
  k, v, table, seq_lens, k_scale, v_scale, k_true, v_true = paged_fp8(
    rng, lens, page_size, 2, 64, fmt
  )
  q = randn(rng, (len(lens), 3, 8, 64), dtype)
  out, lse = jax_fmha.attention(
    q,
    k,
    v,
    block_table=table,
    seq_lens=seq_lens,
    k_scale=k_scale,
    v_scale=v_scale,
    causal=True,
    return_lse=True,
  )
  kw = dict(causal=True)
  expected, expected_lse = ref.paged(
    q, dequantize_np(k, k_scale), dequantize_np(v, v_scale), table, seq_lens, **kw
  )
  assert_attention_close(out, expected, dtype, lse, expected_lse)
  unquantized, _ = ref.paged(q, k_true, v_true, table, seq_lens, **kw)
  assert_near_unquantized(out, unquantized, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", [1, 4, 16])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_paged_decode_gqa_split_kv(rng, fmt, group, num_splits):
  dtype = FLOAT_DTYPES["bfloat16"]
  hkv = 16 // group
  lens = [700, 17, 260]
  k, v, table, seq_lens, k_scale, v_scale, k_true, v_true = paged_fp8(rng, lens, 16, hkv, 128, fmt)
  q = randn(rng, (len(lens), 1, 16, 128), dtype)
  out, lse = jax_fmha.attention(
    q,
    k,
    v,
    block_table=table,
    seq_lens=seq_lens,
    k_scale=k_scale,
    v_scale=v_scale,
    num_splits=num_splits,
    return_lse=True,
  )
  expected, expected_lse = ref.paged(
    q, dequantize_np(k, k_scale), dequantize_np(v, v_scale), table, seq_lens
  )
  assert_attention_close(out, expected, dtype, lse, expected_lse)
  unquantized, _ = ref.paged(q, k_true, v_true, table, seq_lens)
  assert_near_unquantized(out, unquantized, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_contiguous_cache(rng, fmt, dtype):
  dtype = FLOAT_DTYPES[dtype]
  seq_lens = np.asarray([0, 150, 77], np.int32)
  owned = np.arange(150)[None, :] < seq_lens[:, None]
  k, k_scale, k_true = fp8_values(rng, (3, 150, 2, 64), fmt, owned)
  v, v_scale, v_true = fp8_values(rng, (3, 150, 2, 64), fmt, owned)
  q = randn(rng, (3, 4, 8, 64), dtype)
  kw = dict(causal=True, window=(50, 0), softcap=8.0)
  out, lse = jax_fmha.attention(
    q, k, v, seq_lens=seq_lens, k_scale=k_scale, v_scale=v_scale, return_lse=True, **kw
  )
  expected, expected_lse = ref.kv_cache(
    q, dequantize_np(k, k_scale), dequantize_np(v, v_scale), seq_lens, **kw
  )
  assert_attention_close(out, expected, dtype, lse, expected_lse)
  unquantized, _ = ref.kv_cache(q, k_true, v_true, seq_lens, **kw)
  assert_near_unquantized(out, unquantized, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_and_packed_keys(rng, fmt):
  """FP8 keys in the dense and packed (variable-length) layouts too."""
  dtype = FLOAT_DTYPES["bfloat16"]
  k, k_scale, _ = fp8_values(rng, (2, 90, 2, 64), fmt)
  v, v_scale, _ = fp8_values(rng, (2, 90, 2, 64), fmt)
  q = randn(rng, (2, 90, 4, 64), dtype)
  scales = dict(k_scale=k_scale, v_scale=v_scale)
  out = jax_fmha.attention(q, k, v, causal=True, **scales)
  kd, vd = dequantize_np(k, k_scale), dequantize_np(v, v_scale)
  expected, _ = ref.dense(q, kd, vd, causal=True)
  assert_attention_close(out, expected, dtype)
  cu_q = np.asarray([0, 30, 31], np.int32)
  cu_k = np.asarray([0, 90, 170], np.int32)
  q_packed = randn(rng, (31, 4, 64), dtype)
  k_packed, v_packed = k.reshape(180, 2, 64), v.reshape(180, 2, 64)
  out = jax_fmha.attention(
    q_packed, k_packed, v_packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, **scales
  )
  expected, _ = ref.packed(
    q_packed,
    dequantize_np(k_packed, k_scale),
    dequantize_np(v_packed, v_scale),
    cu_q,
    cu_k,
    causal=True,
  )
  assert_attention_close(out, expected, dtype)


def test_kernel_agrees_with_the_reference_backend(rng):
  """backend='reference' dequantizes to float32 and runs the pure-JAX reference: the same
  semantics as the kernel, to float32 rounding."""
  k, v, table, seq_lens, k_scale, v_scale, _, _ = paged_fp8(
    rng, [50, 3, 33], 8, 2, 64, "float8_e4m3fn"
  )
  q = randn(rng, (3, 2, 4, 64), np.float32)
  call = lambda backend: jax_fmha.attention(
    q,
    k,
    v,
    block_table=table,
    seq_lens=seq_lens,
    k_scale=k_scale,
    v_scale=v_scale,
    causal=True,
    return_lse=True,
    backend=backend,
  )
  (out, lse), (expected, expected_lse) = call("auto"), call("reference")
  assert_close(out, expected, rtol=1e-5, atol=2e-5)
  assert_close(lse, expected_lse, rtol=2e-6, atol=2e-5, what="lse")


@pytest.mark.parametrize("fmt", FORMATS)
def test_scales_broadcast(rng, fmt):
  """A Python float, a float32 scalar and the same value per head agree bit for bit;
  omitted scales are 1.0; per-head scales apply to their own head only."""
  k, _, _ = fp8_values(rng, (2, 40, 2, 32), fmt)
  v, _, _ = fp8_values(rng, (2, 40, 2, 32), fmt)
  q = randn(rng, (2, 1, 4, 32), np.float32)
  call = lambda ks, vs: np.asarray(jax_fmha.attention(q, k, v, k_scale=ks, v_scale=vs))
  as_float = call(0.75, 2.0)
  np.testing.assert_array_equal(call(np.float32(0.75), jnp.float32(2.0)), as_float)
  np.testing.assert_array_equal(
    call(np.full(2, 0.75, np.float32), jnp.full((2,), 2.0, jnp.float32)), as_float
  )
  np.testing.assert_array_equal(call(None, None), call(1.0, 1.0))
  per_head = call(np.asarray([0.75, 0.1], np.float32), np.asarray([2.0, 5.0], np.float32))
  np.testing.assert_array_equal(per_head[:, :, :2], as_float[:, :, :2])  # KV head 0
  expected, _ = ref.dense(
    q,
    dequantize_np(k, np.asarray([0.75, 0.1])),
    dequantize_np(v, np.asarray([2.0, 5.0])),
  )
  assert_close(per_head, expected, rtol=1e-5, atol=2e-5)


def test_fp8_nan_in_a_sequence_stays_in_its_rows(rng):
  """A NaN FP8 key inside a sequence makes that sequence's rows NaN (as a NaN bfloat16
  key would); other sequences are unaffected."""
  fmt = "float8_e4m3fn"
  k, v, table, seq_lens, k_scale, v_scale, _, _ = paged_fp8(rng, [20, 20], 16, 1, 32, fmt)
  k[table[1, 0], 3] = np.nan
  q = randn(rng, (2, 1, 2, 32), np.float32)
  out = np.asarray(
    jax_fmha.attention(
      q, k, v, block_table=table, seq_lens=seq_lens, k_scale=k_scale, v_scale=v_scale
    )
  )
  assert np.isnan(out[1]).all() and not np.isnan(out[0]).any()


def test_vmap(rng):
  """vmap over queries with shared pages folds into one call, with shared or per-element
  scales (they join the batch: [B, Hkv]); both match the unbatched calls."""
  fmt = "float8_e5m2"
  k, v, table, seq_lens, k_scale, v_scale, _, _ = paged_fp8(rng, [50, 20], 16, 2, 32, fmt)
  q = randn(rng, (3, 2, 1, 4, 32), np.float32)

  def attend(q, k_scale, v_scale):
    return jax_fmha.attention(
      q,
      k,
      v,
      block_table=table,
      seq_lens=seq_lens,
      k_scale=k_scale,
      v_scale=v_scale,
      num_splits=1,  # the same for a batch and its elements: equal results bit for bit
    )

  shared = jax.vmap(attend, in_axes=(0, None, None))
  out = shared(q, k_scale, v_scale)
  jaxpr = str(jax.make_jaxpr(shared)(q, k_scale, v_scale))
  assert jaxpr.count("jax_fmha_attention_fwd") == 1 and "while" not in jaxpr
  k_scales = np.stack([k_scale, 2 * k_scale, 0.5 * k_scale])
  per_element = jax.vmap(attend, in_axes=(0, 0, None))
  jaxpr = str(jax.make_jaxpr(per_element)(q, k_scales, v_scale))
  assert jaxpr.count("jax_fmha_attention_fwd") == 1 and "while" not in jaxpr
  per_element = per_element(q, k_scales, v_scale)
  for n in range(3):
    np.testing.assert_array_equal(out[n], attend(q[n], k_scale, v_scale))
    np.testing.assert_array_equal(per_element[n], attend(q[n], k_scales[n], v_scale))


def test_grad_raises(rng):
  k, k_scale, _ = fp8_values(rng, (1, 8, 1, 16), "float8_e4m3fn")
  q = randn(rng, (1, 2, 1, 16), np.float32)
  loss = lambda q: jax_fmha.attention(q, k, k, k_scale=k_scale, v_scale=k_scale).sum()
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(loss)(q)


# ---------------------------------------------------------------------------------------
# Quantization: update_kv_cache into FP8 caches, quantize_kv
# ---------------------------------------------------------------------------------------


def special_values(fmt, n):
  """n float32 values that exercise the quantizer: NaN, +-inf, past the range, ties at
  the top of the range, the subnormal range and below, exact FP8 values and their
  midpoints (ties to even), and normal values."""
  top = fp8_max(fmt)
  grid = np.arange(256, dtype=np.uint8).view(FP8[fmt]).astype(np.float32)
  grid = np.unique(grid[np.isfinite(grid)])
  midpoints = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)
  fixed = np.asarray(
    [np.nan, -np.nan, np.inf, -np.inf, 1e30, -1e30, top, -top, top * 1.03, top * 1.07]
    + [0.0, -0.0, 1e-30, -1e-30, 1e-3, 2.0**-10, 2.0**-17, 3 * 2.0**-11],
    np.float32,
  )
  values = np.concatenate([fixed, grid, midpoints, np.float32(2) * midpoints])
  return np.resize(values, n)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("new_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("paged", [True, False])
def test_update_quantizes_bit_exact(rng, fmt, new_dtype, paged):
  """Each new value becomes x * (1 / scale[head]) rounded to nearest even, saturated to
  +-max (infinities too), NaN kept; every slot not written keeps its bits."""
  hkv, d = 2, 64
  if paged:
    cache_shape, table = (6, 4, hkv, d), np.asarray([[3, 1, 5], [0, 2, 4]], np.int32)
  else:
    cache_shape, table = (2, 12, hkv, d), None
  poison = np.arange(np.prod(cache_shape)).reshape(cache_shape) % 256
  k_cache = poison.astype(np.uint8).view(FP8[fmt])  # every bit pattern, NaN codes too
  v_cache = k_cache[::-1].copy()
  k_new = special_values(fmt, 2 * 3 * hkv * d).reshape(2, 3, hkv, d)
  with np.errstate(over="ignore"):  # float16 new tokens: past its range is inf, as wanted
    k_new = (k_new * rng.choice([1.0, 0.5, 3.0], k_new.shape)).astype(FLOAT_DTYPES[new_dtype])
  v_new = randn(rng, k_new.shape, FLOAT_DTYPES[new_dtype], scale=40.0)
  k_scale = np.asarray([1.0, 0.37], np.float32)
  v_scale = np.float32(0.03)  # a scalar: every head
  cache_seqlens = np.asarray([5, 0], np.int32)
  outs = {
    backend: jax_fmha.update_kv_cache(
      k_cache,
      v_cache,
      k_new,
      v_new,
      table,
      cache_seqlens,
      k_scale=k_scale,
      v_scale=v_scale,
      backend=backend,
    )
    for backend in ("auto", "reference")
  }
  for cache, new, scale, got, got_ref in (
    (k_cache, k_new, k_scale, outs["auto"][0], outs["reference"][0]),
    (v_cache, v_new, np.full(hkv, v_scale), outs["auto"][1], outs["reference"][1]),
  ):
    expected = cache.copy()
    for b in range(2):
      for t in range(3):
        pos = cache_seqlens[b] + t
        slot = (table[b, pos // 4], pos % 4) if paged else (b, pos)
        expected[slot] = quantize_np(np.asarray(new[b, t], np.float32), scale, fmt)
    assert_same_fp8(got, expected, "kernel")
    assert_same_fp8(got_ref, expected, "reference")


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizer_saturates_and_keeps_nan(fmt):
  """The documented edge cases, spelled out: +-inf and finite overflow give +-max, NaN
  stays NaN, values round to nearest even."""
  top = fp8_max(fmt)
  values = np.asarray([np.inf, -np.inf, 1e6, -1e6, np.nan, 1.0625, 1.1875, 2.0**-20], np.float32)
  cache = jnp.zeros((1, 8, 1, 8), FP8[fmt])
  new = jnp.asarray(np.broadcast_to(values[:, None], (8, 8))[None, :, None, :].copy())
  k, _ = jax_fmha.update_kv_cache(cache, cache, new, new, None, jnp.zeros((1,), jnp.int32))
  got = np.asarray(k).astype(np.float32)[0, :, 0, 0]
  # 1.0625 and 1.1875 are ties in e4m3fn, to even: 1.0 and 1.25 (also nearest in e5m2).
  np.testing.assert_array_equal(got[[0, 1, 2, 3]], [top, -top, top, -top])
  assert np.isnan(got[4])
  np.testing.assert_array_equal(got[[5, 6, 7]], [1.0, 1.25, 0.0])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("page_size", [1, 16, None])  # None: contiguous cache
@pytest.mark.parametrize("packed_new", [False, True])
def test_append_then_attend_round_trip(rng, fmt, page_size, packed_new):
  """attention_with_kvcache over an FP8 cache: the new bfloat16 tokens are quantized into
  the cache, then attended with the history, all dequantized."""
  dtype = FLOAT_DTYPES["bfloat16"]
  cached, hkv, d = [5, 0, 33], 2, 64
  new = [3, 3, 3] if not packed_new else [2, 0, 5]
  if page_size is None:
    k, k_scale, _ = fp8_values(rng, (3, 48, hkv, d), fmt)
    v, v_scale, _ = fp8_values(rng, (3, 48, hkv, d), fmt)
    table = None
    history = lambda x, b: x[b, : cached[b]]
  else:
    k, v, table, _, k_scale, v_scale, _, _ = paged_fp8(rng, [48] * 3, page_size, hkv, d, fmt)
    history = lambda x, b: ref.gather_pages(x, table[b], cached[b])
  if packed_new:
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    k_new, v_new = randn(rng, (cu[-1], hkv, d), dtype), randn(rng, (cu[-1], hkv, d), dtype)
    q = randn(rng, (cu[-1], 8, d), dtype)
    rows = lambda b: slice(cu[b], cu[b + 1])
  else:
    cu = None
    k_new, v_new = randn(rng, (3, 3, hkv, d), dtype), randn(rng, (3, 3, hkv, d), dtype)
    q = randn(rng, (3, 3, 8, d), dtype)
    rows = lambda b: b
  cache_seqlens = np.asarray(cached, np.int32)
  out, k2, v2 = jax_fmha.attention_with_kvcache(
    q,
    k,
    v,
    k_new,
    v_new,
    cache_seqlens=cache_seqlens,
    block_table=table,
    cu_seqlens_q=cu,
    k_scale=k_scale,
    v_scale=v_scale,
    causal=True,
  )
  assert k2.dtype == v2.dtype == FP8[fmt]
  for b in range(3):
    keys = np.concatenate([history(k, b), quantize_np(k_new[rows(b)], k_scale, fmt)])
    values = np.concatenate([history(v, b), quantize_np(v_new[rows(b)], v_scale, fmt)])
    expected, _ = ref.attend_sequence(
      q[rows(b)], dequantize_np(keys, k_scale), dequantize_np(values, v_scale), causal=True
    )
    assert_close(np.asarray(out)[rows(b)], expected, what=f"sequence {b}", rtol=1e-2, atol=1e-2)
  # The returned caches hold what update_kv_cache writes.
  k3, v3 = jax_fmha.update_kv_cache(
    k, v, k_new, v_new, table, cache_seqlens, cu, k_scale=k_scale, v_scale=v_scale
  )
  assert_same_fp8(k2, k3)
  assert_same_fp8(v2, v3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_vmap(rng, fmt):
  """update_kv_cache into FP8 caches under vmap: each element's own cache and scales."""
  caches = jnp.zeros((3, 2, 8, 2, 16), FP8[fmt])
  new = randn(rng, (3, 2, 1, 2, 16), np.float32)
  scales = np.asarray([[1.0, 2.0], [0.5, 0.25], [3.0, 1.0]], np.float32)
  lens = jnp.asarray([1, 4], jnp.int32)
  update = lambda c, n, s: jax_fmha.update_kv_cache(c, c, n, n, None, lens, k_scale=s, v_scale=s)
  k, _ = jax.vmap(update)(caches, new, scales)
  for e in range(3):
    assert_same_fp8(k[e], update(caches[e], new[e], scales[e])[0])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_kv(rng, fmt, dtype):
  """Per-KV-head amax scaling: scale = amax / fp8_max over finite values (1 for a head
  of zeros), values quantized as update_kv_cache does, and the documented error bound."""
  dtype = FLOAT_DTYPES[dtype]
  x = randn(rng, (5, 16, 3, 32), np.float32) * np.asarray([3.0, 0.0, 0.01], np.float32)[:, None]
  x[0, 0, 0, :4] = [np.inf, -np.inf, np.nan, 0.0]
  x = x.astype(dtype)
  cache, scale = jax_fmha.quantize_kv(x, FP8[fmt])
  assert cache.dtype == FP8[fmt] and scale.dtype == np.float32 and scale.shape == (3,)
  xf = np.asarray(x, np.float32)
  finite = np.where(np.isfinite(xf), np.abs(xf), 0)
  amax = finite.max(axis=(0, 1, 3))
  np.testing.assert_allclose(np.asarray(scale)[[0, 2]], (amax / fp8_max(fmt))[[0, 2]], rtol=2e-7)
  assert scale[1] == 1.0  # the zero head
  assert_same_fp8(cache, quantize_np(xf, np.asarray(scale), fmt))
  back = dequantize_np(cache, scale)
  np.testing.assert_allclose(back[0, 0, 0, :2], [amax[0], -amax[0]], rtol=1e-6)  # +-inf
  assert np.isnan(back[0, 0, 0, 2])
  # Error model: relative 2^-(M+1) in the normal range, half a subnormal step below.
  mantissa_bits = {"float8_e4m3fn": 3, "float8_e5m2": 2}[fmt]
  smallest_normal = float(ml_dtypes.finfo(FP8[fmt]).smallest_normal)
  subnormal_step = smallest_normal / 2**mantissa_bits
  ok = np.isfinite(xf)
  s = np.broadcast_to(np.asarray(scale, np.float64)[:, None], xf.shape)[ok]
  err = np.abs(back[ok] - xf[ok])
  bound = np.maximum(2.0 ** -(mantissa_bits + 1) * np.abs(xf[ok]), subnormal_step / 2 * s)
  assert (err <= bound * (1 + 1e-5)).all(), float((err / bound).max())


# ---------------------------------------------------------------------------------------
# Bad input: clear errors at trace time, naming the argument
# ---------------------------------------------------------------------------------------


def _fp8_paged_args(**change):
  k = jnp.zeros((10, 16, 2, 64), jnp.float8_e4m3fn)
  args = dict(
    q=jnp.zeros((2, 1, 4, 64), jnp.bfloat16),
    k=k,
    v=k,
    block_table=jnp.zeros((2, 3), jnp.int32),
    seq_lens=jnp.zeros((2,), jnp.int32),
    k_scale=jnp.ones((2,), jnp.float32),
    v_scale=0.5,
  )
  args.update(change)
  return args


@pytest.mark.parametrize(
  "change, error, match",
  [
    (
      dict(q=jnp.zeros((2, 1, 4, 64), jnp.int8)),
      TypeError,
      r"^q: expected dtype float32, bfloat16, float16 or an FP8 format \(float8_e4m3fn, "
      r"float8_e5m2\), got int8",
    ),
    (
      dict(v=jnp.zeros((10, 16, 2, 64), jnp.float8_e5m2)),
      TypeError,
      r"^k, v must share one dtype, got k=float8_e4m3fn, v=float8_e5m2",
    ),
    (
      dict(k=jnp.zeros((10, 16, 2, 64), jnp.int8)),
      TypeError,
      r"^k: expected dtype float32, bfloat16 or float16 \(q's\), or an FP8 cache "
      r"\(float8_e4m3fn, float8_e5m2\), got int8",
    ),
    (
      dict(k_scale=jnp.ones((3,), jnp.float32)),
      ValueError,
      r"^k_scale: expected a scalar, shape \[Hkv=2\] \(one scale per KV head\) or \[B=2, "
      r"Hkv=2\] \(per sequence and KV head\), got shape \(3,\)",
    ),
    (
      dict(v_scale=jnp.ones((1, 2), jnp.float32)),
      ValueError,
      r"^v_scale: expected a scalar, shape \[Hkv=2\].*got shape \(1, 2\)",
    ),
    (
      dict(k_scale=jnp.ones((2,), jnp.bfloat16)),
      TypeError,
      r"^k_scale: expected float32 \(a Python float or a float32 array\), got bfloat16",
    ),
    (dict(v_scale=True), TypeError, r"^v_scale: expected a float scale, got True"),
    (
      dict(
        k=jnp.zeros((10, 16, 2, 64), jnp.bfloat16),
        v=jnp.zeros((10, 16, 2, 64), jnp.bfloat16),
      ),
      ValueError,
      r"^k_scale: dequantization scales are for FP8 k \(float8_e4m3fn, float8_e5m2\), "
      r"got k of dtype bfloat16: drop k_scale",
    ),
    (
      dict(k=jnp.zeros((10, 16, 2, 64), jnp.float16), v=jnp.zeros((10, 16, 2, 64), jnp.float16)),
      TypeError,
      r"^q, k, v must share one dtype, got q=bfloat16, k=float16, v=float16",
    ),
  ],
)
def test_attention_bad_input(change, error, match):
  with pytest.raises(error, match=match):
    jax_fmha.attention(**_fp8_paged_args(**change))


def test_scales_without_fp8_name_the_scale_given():
  args = _fp8_paged_args(k=jnp.zeros((10, 16, 2, 64)), v=jnp.zeros((10, 16, 2, 64)))
  args["q"] = jnp.zeros((2, 1, 4, 64))
  del args["k_scale"]
  with pytest.raises(ValueError, match=r"^v_scale: dequantization scales are for FP8 v"):
    jax_fmha.attention(**args)


@pytest.mark.parametrize(
  "change, error, match",
  [
    (
      dict(k_new=jnp.zeros((2, 1, 2, 64), jnp.float8_e4m3fn)),
      TypeError,
      r"^k_new: expected dtype float32, bfloat16 or float16, got float8_e4m3fn",
    ),
    (
      dict(v_cache=jnp.zeros((10, 16, 2, 64), jnp.float8_e5m2)),
      TypeError,
      r"^k_cache, v_cache must share one dtype, got k_cache=float8_e4m3fn, v_cache=float8_e5m2",
    ),
    (
      dict(v_new=jnp.zeros((2, 1, 2, 64), jnp.float16)),
      TypeError,
      r"^k_new, v_new must share one dtype, got k_new=bfloat16, v_new=float16",
    ),
    (
      dict(v_scale=np.ones((4,), np.float32)),
      ValueError,
      r"^v_scale: expected a scalar, shape \[Hkv=2\]",
    ),
    (
      dict(k_scale=np.ones((2,), np.float64)),
      TypeError,
      r"^k_scale: expected float32 .*, got float64",
    ),
    (
      dict(
        k_cache=jnp.zeros((10, 16, 2, 64), jnp.bfloat16),
        v_cache=jnp.zeros((10, 16, 2, 64), jnp.bfloat16),
      ),
      ValueError,
      r"^k_scale: dequantization scales are for FP8 k_cache .*got k_cache of dtype bfloat16",
    ),
  ],
)
def test_update_bad_input(change, error, match):
  cache = jnp.zeros((10, 16, 2, 64), jnp.float8_e4m3fn)
  new = jnp.zeros((2, 1, 2, 64), jnp.bfloat16)
  args = dict(
    k_cache=cache,
    v_cache=cache,
    k_new=new,
    v_new=new,
    block_table=jnp.zeros((2, 3), jnp.int32),
    cache_seqlens=jnp.zeros((2,), jnp.int32),
    k_scale=1.0,
    v_scale=1.0,
  )
  args.update(change)
  with pytest.raises(error, match=match):
    jax_fmha.update_kv_cache(**args)


@pytest.mark.parametrize(
  "args, error, match",
  [
    (
      (jnp.zeros((4, 2, 8)), jnp.bfloat16),
      TypeError,
      r"^dtype: expected float8_e4m3fn or float8_e5m2, got bfloat16",
    ),
    (
      (jnp.zeros((4, 2, 8), jnp.float8_e4m3fn),),
      TypeError,
      r"^cache: expected dtype float32, bfloat16 or float16, got float8_e4m3fn",
    ),
    ((jnp.zeros((8,)),), ValueError, r"^cache: expected rank >= 2 \(\[\.\.\., Hkv, D\]\)"),
  ],
)
def test_quantize_kv_bad_input(args, error, match):
  with pytest.raises(error, match=match):
    jax_fmha.quantize_kv(*args)


def test_handlers_check_what_python_checks():
  """A custom call made without the Python checks: the handlers refuse FP8 K/V without
  scales, scales with float K/V, FP8 queries without q_scale or with float keys, and FP8
  new tokens (ffi/common)."""
  from jax_fmha.attention import attention_fwd
  from jax_fmha.kv_cache import update_kv_cache_p

  fp8 = jnp.zeros((1, 8, 2, 16), jnp.float8_e4m3fn)
  q, scales = jnp.zeros((1, 1, 2, 16), jnp.float32), jnp.ones((2,), jnp.float32)
  attrs = dict(scale=1.0, softcap=0.0, window=(-1, -1), kv_layout="uniform", num_splits=1)
  attend = lambda q, k, **kw: attention_fwd(q, k, k, max_seqlen_q=1, **attrs, **kw)
  cases = [
    (lambda: attend(q, fp8), "an FP8 operand needs k_scale of \\[B, Hkv\\] elements"),
    (lambda: attend(q, q, k_scale=scales, v_scale=scales), "k_scale is only for an FP8 operand"),
    (
      lambda: attend(fp8[:, :1], fp8, k_scale=scales, v_scale=scales, out_dtype=jnp.bfloat16),
      "an FP8 operand needs q_scale of \\[B, Hkv\\] elements",
    ),
    (
      lambda: attend(fp8[:, :1], q, q_scale=scales, out_dtype=jnp.bfloat16),
      "FP8 q needs k of q's FP8 format",
    ),
    (
      lambda: attend(fp8[:, :1], fp8, q_scale=scales, k_scale=scales, v_scale=scales),
      "with FP8 q, out must be float32, bfloat16 or float16",
    ),
    (
      lambda: update_kv_cache_p.bind(
        fp8,
        fp8,
        fp8[:, :1],
        fp8[:, :1],
        jnp.zeros((0, 0), jnp.int32),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((0,), jnp.int32),
        scales,
        scales,
        kv_layout="cache",
      ),
      "new tokens must have the caches' dtype, or be float32, bfloat16 or float16 for FP8",
    ),
  ]
  for call, match in cases:
    with pytest.raises(jax.errors.JaxRuntimeError, match=match):
      jax.block_until_ready(call())


# ---------------------------------------------------------------------------------------
# The GPU lowering (the CUDA kernels: tests/test_fp8_gpu.py)
# ---------------------------------------------------------------------------------------


def test_fp8_lowers_for_the_gpu(monkeypatch):
  """Lowering an FP8 cache for CUDA (here with CUDA handlers pretended present, so a
  CPU-only build checks it too) emits the custom calls, for attention, update_kv_cache and
  attention_with_kvcache."""
  monkeypatch.setattr(jax_fmha._ffi, "has_target", lambda target, platform: True)
  args = _fp8_paged_args()
  q, k, table, lens = args["q"], args["k"], args["block_table"], args["seq_lens"]
  scales = jnp.ones((2,), jnp.float32)
  new = jnp.zeros((2, 1, 2, 64), jnp.bfloat16)
  calls = [
    (
      lambda q, k: jax_fmha.attention(
        q, k, k, block_table=table, seq_lens=lens, k_scale=scales, v_scale=scales
      ),
      (q, k),
      ["jax_fmha_attention_fwd"],
    ),
    (
      lambda k, new: jax_fmha.update_kv_cache(
        k, k, new, new, table, lens, k_scale=scales, v_scale=scales
      ),
      (k, new),
      ["jax_fmha_update_kv_cache"],
    ),
    (
      lambda q, k, new: jax_fmha.attention_with_kvcache(
        q, k, k, new, new, cache_seqlens=lens, block_table=table, k_scale=scales, v_scale=scales
      ),
      (q, k, new),
      ["jax_fmha_update_kv_cache", "jax_fmha_attention_fwd"],
    ),
  ]
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in jax_fmha.FFI_TARGETS]
  for fn, fn_args, targets in calls:
    export = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)
    text = export(*fn_args).mlir_module()
    for target in targets:
      assert f"@{target}" in text or f'"{target}"' in text, target
