"""GPU-only tests of FP8 queries on the Hopper kernel (docs/design/fp8_attention.md): FP8
Q K^T (float8_e4m3fn q and k, FP8 wgmma) with P V in v's 16-bit dtype, or with float8_e4m3fn v
(FP8 P V: P rounded to e4m3fn). Skipped without a CUDA device of compute capability 9 and a
build with the sm_90a kernel.

The public API runs them (its validation, split planning and merge included), against the
float64 NumPy reference over the dequantized inputs. The products of FP8 values are exact,
but FP8 wgmma keeps only about 14 significant bits in its sums, so the tolerance is that of
16-bit inputs (tests/test_attention_gpu.py's check, in the coarser of v's and the output's
dtype) or, where the scores are large, the bound that precision gives (fp8_check). With FP8 v
the rounding of P to e4m3fn adds its own bound. Sequences get scales [B, Hkv] that differ by
factors of 2 to 8, and the device memory the outputs land in is filled with NaN first: an
element the kernel skips shows.

  pytest tests/test_fp8_attention_gpu.py -q
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_attention_gpu import BF16, F16, OUT_TOL, check, gpu, rows_of
from test_fp8_attention import dequantize, outlier_normal
from test_fp8_gpu import poison_device_memory

import jax_fmha

import numpy_reference as ref


def _hopper() -> bool:
  try:
    devices = jax.devices("gpu")
  except RuntimeError:
    return False
  return (
    bool(devices)
    and jax_fmha.build_info()["hopper_kernel"]
    and devices[0].compute_capability.split(".")[0] == "9"
  )


pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU and a build with 90a"),
]

V_DTYPES = [BF16, F16]
OUT_DTYPES = [BF16, F16, np.dtype(np.float32)]
E4M3 = np.dtype(jnp.float8_e4m3fn)


class Fp8Inputs:
  """e4m3fn q and k quantized per sequence and KV head (quantize_fp8), v in `v_dtype` (e4m3fn:
  quantized so too, with v_scale). The odd sequences' q are 8x larger, k 2x smaller and (FP8)
  v 4x larger, so that the scales and their product differ per sequence (scores 4x larger: a
  sharper softmax that float32 sums still resolve). ``exact``: the dequantized values
  (float64) the kernel must compute on."""

  def __init__(self, rng, q_shape, kv_shape, hkv, v_dtype, cu_q=None, cu_k=None):
    q, k, v = (outlier_normal(rng, s) for s in (q_shape, kv_shape, kv_shape))
    fp8_v = np.dtype(v_dtype) == E4M3
    for x, cu, factor in ((q, cu_q, 8.0), (k, cu_k, 0.5)) + (((v, cu_k, 4.0),) if fp8_v else ()):
      sequences = range(x.shape[0]) if cu is None else map(slice, cu[:-1], cu[1:])
      for b, rows in enumerate(sequences):
        x[rows] *= factor if b % 2 else 1.0
    quantize = lambda x, cu: [
      np.asarray(a) for a in jax_fmha.quantize_fp8(x, num_kv_heads=hkv, cu_seqlens=cu)
    ]
    self.q, q_scale = quantize(q, cu_q)
    self.k, k_scale = quantize(k, cu_k)
    self.scales = dict(q_scale=q_scale, k_scale=k_scale)
    if fp8_v:
      self.v, self.scales["v_scale"] = quantize(v, cu_k)
      v_exact = dequantize(self.v, self.scales["v_scale"], cu_k)
    else:
      self.v = v.astype(v_dtype)
      v_exact = self.v.astype(np.float64)
    self.exact = (dequantize(self.q, q_scale, cu_q), dequantize(self.k, k_scale, cu_k), v_exact)

  def attend(self, out_dtype=BF16, **kw):
    return attend(self.q, self.k, self.v, out_dtype, **self.scales, **kw)


def attend(q, k, v, out_dtype=BF16, **kw):
  """The public API on the GPU (q, k, v placed there; the other arrays follow them), outputs
  poisoned first; NumPy (out, lse)."""
  poison_device_memory()
  out, lse = jax_fmha.attention(gpu(q), gpu(k), gpu(v), out_dtype=out_dtype, return_lse=True, **kw)
  assert out.dtype == out_dtype
  return np.asarray(out), np.asarray(lse)


def fp8_check(out, lse, expected, expected_lse, dtype, q, k, what="", *, v=None):
  """check() for FP8 Q K^T. Hopper's FP8 wgmma sums with about 14 significant bits
  (docs/design/fp8_attention.md, "Accumulation precision"), so a score s is off by up to
  about 2^-13 |s|, and the output by up to twice the largest such error relative to max |v|:
  the tolerance is 16-bit inputs' or 2^-12 times the largest |score| (float64 q, k: dense
  [B, S, H, D] or [S, H, D], every pair counted), whichever is larger.

  FP8 P V (`v`: float64 values, channels last) adds the rounding of P to e4m3fn. The kernel
  sums P~_j v_j with P~_j = e4m3(P_j) and divides by l = sum_j P_j (P unrounded), l >= 1 (the
  row maximum's term). A probability in e4m3fn's normal range moves by at most 2^-4 of itself
  (3 mantissa bits, round to nearest), one below it (< 2^-6) by at most 2^-10 absolute, with
  signs that vary key to key; so output channel c moves by at most 2^-4 * sum_j P_j |v_jc| / l
  <= 2^-4 * max_j |v_jc| from the normal range, and the subnormal terms average out far below
  that: 2^-4 * max |v_c| per channel (the keys' maximum over every sequence and head) is added
  to the tolerance."""
  q, k = (x if x.ndim == 4 else x[None] for x in (q, k))
  group = q.shape[2] // k.shape[2]
  scores = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, group, axis=2)) / np.sqrt(q.shape[-1])
  accumulation = 2.0**-12 * float(np.abs(scores).max(initial=0.0))
  out_tol = max(OUT_TOL[dtype], accumulation)
  if v is not None:
    scale = 1.0 + float(np.abs(expected).max(initial=0.0))  # (check's: tolerances relative to it)
    out_tol = out_tol + 2.0**-4 * np.abs(v).reshape(-1, v.shape[-1]).max(axis=0) / scale
  check(out, lse, expected, expected_lse, dtype, what, out_tol=out_tol)


def tolerance_dtype(v_dtype, out_dtype):
  """The coarser of P V's 16-bit type and the output's."""
  return BF16 if BF16 in (np.dtype(v_dtype), np.dtype(out_dtype)) else F16


@pytest.mark.parametrize("v_dtype", V_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
def test_head_dims(rng, v_dtype, d):
  """Causal Sq < Sk, GQA 8/2; d96 and d192 run at d128 and d256, zero-padded."""
  x = Fp8Inputs(rng, (2, 150, 8, d), (2, 300, 2, d), 2, v_dtype)
  out, lse = x.attend(causal=True, num_splits=1)
  expected = ref.dense(*x.exact, causal=True)
  fp8_check(out, lse, *expected, tolerance_dtype(v_dtype, BF16), *x.exact[:2], f"d{d}")


@pytest.mark.parametrize("v_dtype", V_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize(
  "sq, sk, kw",
  [
    (200, 450, dict(causal=True)),  # Sq < Sk
    (300, 130, dict(causal=True)),  # Sq > Sk: the first rows see no key (0, LSE -inf)
    (260, 260, dict(window=(70, 10), softcap=5.0)),
    (1, 700, dict()),  # decode: FP8 queries take the Hopper kernel at every row count
  ],
)
def test_masks_and_output_dtypes(rng, v_dtype, out_dtype, sq, sk, kw):
  x = Fp8Inputs(rng, (2, sq, 8, 128), (2, sk, 2, 128), 2, v_dtype)
  out, lse = x.attend(out_dtype, num_splits=1, **kw)
  expected, expected_lse = ref.dense(*x.exact, **kw)
  tolerance = tolerance_dtype(v_dtype, out_dtype)
  fp8_check(out, lse, expected, expected_lse, tolerance, *x.exact[:2], f"{sq}x{sk} {kw}")
  empty = np.isneginf(expected_lse).transpose(0, 2, 1)
  assert (np.asarray(out, np.float64)[empty] == 0).all()


@pytest.mark.parametrize("hq, hkv", [(8, 2), (32, 4), (4, 4)])
def test_gqa(rng, hq, hkv):
  x = Fp8Inputs(rng, (2, 100, hq, 64), (2, 333, hkv, 64), hkv, BF16)
  out, lse = x.attend(causal=True)
  fp8_check(out, lse, *ref.dense(*x.exact, causal=True), BF16, *x.exact[:2], f"{hq}/{hkv}")


@pytest.mark.parametrize("v_dtype", V_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_packed_varlen_with_empty_sequence(rng, v_dtype, num_splits):
  """Packed queries and keys; sequence 1 is empty, sequence 3 has queries and no key, and q
  rows 0-2 and 410-419 belong to no sequence (0, LSE -inf)."""
  cu_q = np.array([3, 130, 130, 400, 410], np.int32)
  cu_k = np.array([0, 200, 200, 500, 500], np.int32)
  x = Fp8Inputs(rng, (420, 8, 128), (520, 2, 128), 2, v_dtype, cu_q, cu_k)
  kw = dict(causal=True)
  out, lse = x.attend(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, num_splits=num_splits, **kw)
  expected, expected_lse = ref.packed(*x.exact, cu_q, cu_k, **kw)
  fp8_check(out, lse, expected, expected_lse, BF16, *x.exact[:2], f"splits {num_splits}")
  assert (np.asarray(out, np.float64)[rows_of(np.isneginf(expected_lse), dense=False)] == 0).all()


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("num_splits", [3, None])
def test_split_kv(rng, out_dtype, d, num_splits):
  """Float32 partials merged into out_dtype: forced, and chosen by the planner (a long
  prefix under few rows: it splits)."""
  x = Fp8Inputs(rng, (2, 64, 4, d), (2, 3000, 1, d), 1, BF16)
  out, lse = x.attend(out_dtype, causal=True, num_splits=num_splits)
  expected = ref.dense(*x.exact, causal=True)
  fp8_check(out, lse, *expected, BF16, *x.exact[:2], f"d{d} splits {num_splits}")


@pytest.mark.parametrize("v_dtype", [BF16, E4M3], ids=lambda d: d.name)
@pytest.mark.parametrize("page_size", [16, 48, 64])
def test_paged_cache(rng, page_size, v_dtype):
  """An e4m3fn paged key cache with a bfloat16 or an e4m3fn value cache (pages shuffled, one
  scale per KV head each), chunked-prefill queries; TMA runs of gcd(page size, key block)
  rows, and a sequence whose last key block ends inside a page run."""
  b, hq, hkv, d, sq, lens = 3, 8, 2, 128, 20, [0, 37, 300]
  pages_per_seq = -(-max(lens) // page_size)

  def cache(x):
    scale = np.asarray(jax_fmha.quantize_fp8(x, num_kv_heads=hkv)[1]).max(axis=0)  # [Hkv]
    x8 = np.asarray(jnp.asarray(x / scale[None, None, :, None]).astype(jnp.float8_e4m3fn))
    return x8, scale, x8.astype(np.float64) * scale[None, None, :, None]

  shape = (b * pages_per_seq, page_size, hkv, d)
  k8, k_scale, k_exact = cache(outlier_normal(rng, shape))
  if v_dtype == E4M3:
    v, v_scale, v_exact = cache(outlier_normal(rng, shape))
    fp8_v = dict(v_scale=v_scale)
  else:
    v = outlier_normal(rng, shape).astype(v_dtype)
    v_exact, fp8_v = v.astype(np.float64), {}
  table = rng.permutation(b * pages_per_seq).reshape(b, pages_per_seq).astype(np.int32)
  q8, q_scale = (
    np.asarray(a)
    for a in jax_fmha.quantize_fp8(outlier_normal(rng, (b, sq, hq, d)), num_kv_heads=hkv)
  )
  seq_lens = np.array(lens, np.int32)
  out, lse = attend(
    q8,
    k8,
    v,
    block_table=table,
    seq_lens=seq_lens,
    q_scale=q_scale,
    k_scale=k_scale,
    causal=True,
    **fp8_v,
  )
  q_exact = dequantize(q8, q_scale)
  expected = ref.paged(q_exact, k_exact, v_exact, table, seq_lens, causal=True)
  # (the scores' bound over every query row against every cached key; FP8 v: P's rounding)
  all_rows = lambda x: x.reshape(1, -1, *x.shape[2:])
  what = f"page {page_size} v {v_dtype.name}"
  p_rounding = dict(v=v_exact) if v_dtype == E4M3 else {}
  fp8_check(out, lse, *expected, BF16, all_rows(q_exact), all_rows(k_exact), what, **p_rounding)


def test_hlo_shows_the_custom_call(rng):
  x = Fp8Inputs(rng, (1, 130, 4, 64), (1, 130, 2, 64), 2, BF16)
  attend = jax.jit(lambda q, k, v, qs, ks: jax_fmha.attention(q, k, v, q_scale=qs, k_scale=ks))
  text = attend.lower(gpu(x.q), gpu(x.k), gpu(x.v), *map(gpu, x.scales.values())).as_text()
  assert "jax_fmha_attention_fwd" in text and "f8E4M3FN" in text


# ---------------------------------------------------------------------------------------
# FP8 P V: float8_e4m3fn v (the V^T ring, P rounded to e4m3fn, v_scale on O)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
def test_fp8_v_head_dims(rng, d):
  """Causal Sq < Sk, GQA 8/2; d96 and d192 run at d128 and d256, zero-padded."""
  x = Fp8Inputs(rng, (2, 150, 8, d), (2, 300, 2, d), 2, E4M3)
  out, lse = x.attend(causal=True, num_splits=1)
  expected = ref.dense(*x.exact, causal=True)
  fp8_check(out, lse, *expected, BF16, *x.exact[:2], f"d{d}", v=x.exact[2])


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize(
  "sq, sk, kw",
  [
    (200, 450, dict(causal=True)),  # Sq < Sk: the last key block ends inside (zeroed V^T)
    (300, 130, dict(causal=True)),  # Sq > Sk: the first rows see no key (0, LSE -inf)
    (260, 260, dict(window=(70, 10), softcap=5.0)),
    (1, 700, dict()),  # decode
  ],
)
def test_fp8_v_masks_and_output_dtypes(rng, out_dtype, sq, sk, kw):
  x = Fp8Inputs(rng, (2, sq, 8, 128), (2, sk, 2, 128), 2, E4M3)
  out, lse = x.attend(out_dtype, num_splits=1, **kw)
  expected, expected_lse = ref.dense(*x.exact, **kw)
  tolerance = tolerance_dtype(E4M3, out_dtype)
  what = f"{sq}x{sk} {kw}"
  fp8_check(out, lse, expected, expected_lse, tolerance, *x.exact[:2], what, v=x.exact[2])
  empty = np.isneginf(expected_lse).transpose(0, 2, 1)
  assert (np.asarray(out, np.float64)[empty] == 0).all()


@pytest.mark.parametrize("hq, hkv", [(8, 2), (32, 4), (4, 4)])
@pytest.mark.parametrize("d", [64, 256])
def test_fp8_v_gqa(rng, hq, hkv, d):
  """The last row tile of 8/2 and 32/4 (16 and 32 rows) leaves the second consumer idle."""
  x = Fp8Inputs(rng, (2, 100, hq, d), (2, 333, hkv, d), hkv, E4M3)
  out, lse = x.attend(causal=True)
  expected = ref.dense(*x.exact, causal=True)
  fp8_check(out, lse, *expected, BF16, *x.exact[:2], f"{hq}/{hkv}", v=x.exact[2])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("d", [128, 256])
def test_fp8_v_packed_varlen_with_empty_sequence(rng, num_splits, d):
  """Packed queries and keys; sequence 1 is empty, sequence 3 has queries and no key, and q
  rows 0-2 and 410-419 belong to no sequence (0, LSE -inf)."""
  cu_q = np.array([3, 130, 130, 400, 410], np.int32)
  cu_k = np.array([0, 200, 200, 500, 500], np.int32)
  x = Fp8Inputs(rng, (420, 8, d), (520, 2, d), 2, E4M3, cu_q, cu_k)
  kw = dict(causal=True)
  out, lse = x.attend(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, num_splits=num_splits, **kw)
  expected, expected_lse = ref.packed(*x.exact, cu_q, cu_k, **kw)
  what = f"splits {num_splits}"
  fp8_check(out, lse, expected, expected_lse, BF16, *x.exact[:2], what, v=x.exact[2])
  assert (np.asarray(out, np.float64)[rows_of(np.isneginf(expected_lse), dense=False)] == 0).all()


@pytest.mark.parametrize("d", [64, 128, 256])
def test_fp8_v_split_kv(rng, d):
  """Float32 partials (v_scale applied in each) merged into bfloat16."""
  x = Fp8Inputs(rng, (2, 64, 4, d), (2, 3000, 1, d), 1, E4M3)
  out, lse = x.attend(BF16, causal=True, num_splits=3)
  expected = ref.dense(*x.exact, causal=True)
  fp8_check(out, lse, *expected, BF16, *x.exact[:2], f"d{d}", v=x.exact[2])
