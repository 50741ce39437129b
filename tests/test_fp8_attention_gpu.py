"""GPU-only tests of FP8 queries on the Hopper kernel (docs/design/fp8_attention.md): FP8
Q K^T (float8_e4m3fn q and k, FP8 wgmma) with P V in v's 16-bit dtype. Skipped without a
CUDA device of compute capability 9 and a build with the sm_90a kernel.

The public API runs them (its validation, split planning and merge included), against the
float64 NumPy reference over the dequantized inputs: the products of FP8 values are exact
and their sums float32, so the tolerance is that of 16-bit inputs (tests/test_attention_gpu.py's
check, in the coarser of v's and the output's dtype). Sequences get scales [B, Hkv] that
differ by factors of 2 to 8, and the device memory the outputs land in is filled with NaN
first: an element the kernel skips shows.

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

from test_attention_gpu import BF16, F16, check, gpu, rows_of
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


class Fp8Inputs:
  """e4m3fn q and k quantized per sequence and KV head (quantize_fp8), v in `v_dtype`. The
  odd sequences' q are 8x larger and k 2x smaller, so that both scales and their product
  differ per sequence (scores 4x larger: a sharper softmax that float32 sums still resolve).
  ``exact``: the dequantized values (float64) the kernel must compute on."""

  def __init__(self, rng, q_shape, kv_shape, hkv, v_dtype, cu_q=None, cu_k=None):
    q, k, v = (outlier_normal(rng, s) for s in (q_shape, kv_shape, kv_shape))
    for x, cu, factor in ((q, cu_q, 8.0), (k, cu_k, 0.5)):
      sequences = range(x.shape[0]) if cu is None else map(slice, cu[:-1], cu[1:])
      for b, rows in enumerate(sequences):
        x[rows] *= factor if b % 2 else 1.0
    quantize = lambda x, cu: [
      np.asarray(a) for a in jax_fmha.quantize_fp8(x, num_kv_heads=hkv, cu_seqlens=cu)
    ]
    self.q, q_scale = quantize(q, cu_q)
    self.k, k_scale = quantize(k, cu_k)
    self.v = v.astype(v_dtype)
    self.scales = dict(q_scale=q_scale, k_scale=k_scale)
    self.exact = (
      dequantize(self.q, q_scale, cu_q),
      dequantize(self.k, k_scale, cu_k),
      self.v.astype(np.float64),
    )

  def attend(self, out_dtype=BF16, **kw):
    return attend(self.q, self.k, self.v, out_dtype, **self.scales, **kw)


def attend(q, k, v, out_dtype=BF16, **kw):
  """The public API on the GPU (q, k, v placed there; the other arrays follow them), outputs
  poisoned first; NumPy (out, lse)."""
  poison_device_memory()
  out, lse = jax_fmha.attention(gpu(q), gpu(k), gpu(v), out_dtype=out_dtype, return_lse=True, **kw)
  assert out.dtype == out_dtype
  return np.asarray(out), np.asarray(lse)


def tolerance_dtype(v_dtype, out_dtype):
  """The coarser of P V's 16-bit type and the output's."""
  return BF16 if BF16 in (np.dtype(v_dtype), np.dtype(out_dtype)) else F16


@pytest.mark.parametrize("v_dtype", V_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
def test_head_dims(rng, v_dtype, d):
  """Causal Sq < Sk, GQA 8/2; d96 and d192 run at d128 and d256, zero-padded."""
  x = Fp8Inputs(rng, (2, 150, 8, d), (2, 300, 2, d), 2, v_dtype)
  out, lse = x.attend(causal=True, num_splits=1)
  check(out, lse, *ref.dense(*x.exact, causal=True), tolerance_dtype(v_dtype, BF16), f"d{d}")


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
  check(out, lse, expected, expected_lse, tolerance_dtype(v_dtype, out_dtype), f"{sq}x{sk} {kw}")
  empty = np.isneginf(expected_lse).transpose(0, 2, 1)
  assert (np.asarray(out, np.float64)[empty] == 0).all()


@pytest.mark.parametrize("hq, hkv", [(8, 2), (32, 4), (4, 4)])
def test_gqa(rng, hq, hkv):
  x = Fp8Inputs(rng, (2, 100, hq, 64), (2, 333, hkv, 64), hkv, BF16)
  out, lse = x.attend(causal=True)
  check(out, lse, *ref.dense(*x.exact, causal=True), BF16, f"{hq}/{hkv}")


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
  check(out, lse, expected, expected_lse, BF16, f"splits {num_splits}")
  assert (np.asarray(out, np.float64)[rows_of(np.isneginf(expected_lse), dense=False)] == 0).all()


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("num_splits", [3, None])
def test_split_kv(rng, out_dtype, d, num_splits):
  """Float32 partials merged into out_dtype: forced, and chosen by the planner (a long
  prefix under few rows: it splits)."""
  x = Fp8Inputs(rng, (2, 64, 4, d), (2, 3000, 1, d), 1, BF16)
  out, lse = x.attend(out_dtype, causal=True, num_splits=num_splits)
  check(out, lse, *ref.dense(*x.exact, causal=True), BF16, f"d{d} splits {num_splits}")


@pytest.mark.parametrize("page_size", [16, 48, 64])
def test_paged_cache(rng, page_size):
  """An e4m3fn paged key cache with a bfloat16 value cache (pages shuffled), chunked-prefill
  queries; TMA runs of gcd(page size, key block) rows."""
  b, hq, hkv, d, sq, lens = 3, 8, 2, 128, 20, [0, 37, 300]
  pages_per_seq = -(-max(lens) // page_size)
  k = outlier_normal(rng, (b * pages_per_seq, page_size, hkv, d))
  k8, k_scale = (np.asarray(a) for a in jax_fmha.quantize_fp8(k, num_kv_heads=hkv))
  k_scale = k_scale.max(axis=0)  # one scale per KV head for the whole cache: [Hkv]
  k8 = np.asarray(jnp.asarray(k / k_scale[None, None, :, None]).astype(jnp.float8_e4m3fn))
  v = outlier_normal(rng, k.shape).astype(BF16)
  table = rng.permutation(b * pages_per_seq).reshape(b, pages_per_seq).astype(np.int32)
  q8, q_scale = (
    np.asarray(a)
    for a in jax_fmha.quantize_fp8(outlier_normal(rng, (b, sq, hq, d)), num_kv_heads=hkv)
  )
  seq_lens = np.array(lens, np.int32)
  out, lse = attend(
    q8, k8, v, block_table=table, seq_lens=seq_lens, q_scale=q_scale, k_scale=k_scale, causal=True
  )
  k_exact = k8.astype(np.float64) * k_scale[None, None, :, None]
  expected = ref.paged(
    dequantize(q8, q_scale), k_exact, v.astype(np.float64), table, seq_lens, causal=True
  )
  check(out, lse, *expected, BF16, f"page {page_size}")


def test_hlo_shows_the_custom_call(rng):
  x = Fp8Inputs(rng, (1, 130, 4, 64), (1, 130, 2, 64), 2, BF16)
  attend = jax.jit(lambda q, k, v, qs, ks: jax_fmha.attention(q, k, v, q_scale=qs, k_scale=ks))
  text = attend.lower(gpu(x.q), gpu(x.k), gpu(x.v), *map(gpu, x.scales.values())).as_text()
  assert "jax_fmha_attention_fwd" in text and "f8E4M3FN" in text
