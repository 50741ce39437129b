"""FP8 attention inputs (FP8 queries: FlashAttention-3's FP8 forward) on the CPU backend.

Two variants: everything in float8_e4m3fn ("fp8"), and FP8 queries and keys with bfloat16
values ("fp8_qk": P V in bfloat16). Inputs are Gaussian with outlier channels (a few
head-dim channels 10x larger, as activations have), quantized by ``jax_fmha.quantize_fp8``
with amax scales per sequence and KV head. The kernel is compared with the float64 NumPy
reference over the dequantized inputs (exact in float64), with the output dtype's
tolerance: the kernel's own error. The error against the unquantized inputs (what FP8
costs) is bounded and printed apart; docs/design/fp8_attention.md tabulates both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_fp8 import FP8, assert_same_fp8, dequantize_np, fp8_max, paged_fp8, quantize_np

import jax_fmha

import numpy_reference as ref
from conftest import FLOAT_DTYPES, assert_attention_close, assert_close

pytestmark = pytest.mark.usefixtures("on_cpu")

E4M3 = FP8["float8_e4m3fn"]
BF16 = FLOAT_DTYPES["bfloat16"]
VARIANTS = ["fp8", "fp8_qk"]
# Relative RMS error against the unquantized inputs (Gaussian, outlier channels 10x, d 64-256):
# measured 0.02-0.05 for both variants (docs/design/fp8_attention.md).
UNQUANTIZED_RMS = 0.2


def outlier_normal(rng, shape):
  """Standard-normal float32 values with 4 head-dim channels 10x larger."""
  x = rng.standard_normal(shape)
  x[..., rng.choice(shape[-1], 4, replace=False)] *= 10.0
  return x.astype(np.float32)


def per_head(scale, heads):
  """Scales [B, Hkv] as float64 [B, heads] (head h has KV head h // (heads / Hkv)'s)."""
  scale = np.asarray(scale, np.float64)
  return np.repeat(scale, heads // scale.shape[1], axis=1)


def dequantize(x8, scale, cu=None):
  """FP8 x8 dense [B, S, H, D] (packed [T, H, D] with cu) times its sequence's scale of its
  KV head, in float64 (exact)."""
  x = np.asarray(x8).astype(np.float64)
  scales = per_head(scale, x.shape[-2])
  if cu is None:
    return x * scales[:, None, :, None]
  for b in range(len(cu) - 1):
    x[cu[b] : cu[b + 1]] *= scales[b][None, :, None]
  return x


class Inputs:
  """q, k, v of one variant: the arrays passed (``q``, ``k``, ``v``, ``scales``), their
  dequantized values (``exact``: what the kernel must compute on) and the unquantized ones
  (``true``), in float64."""

  def __init__(self, rng, variant, q_shape, kv_shape, hkv, cu_q=None, cu_k=None, fmt=E4M3):
    true = [outlier_normal(rng, s) for s in (q_shape, kv_shape, kv_shape)]
    quantize = lambda x, cu: [
      np.asarray(a) for a in jax_fmha.quantize_fp8(x, num_kv_heads=hkv, cu_seqlens=cu, dtype=fmt)
    ]
    self.q, q_scale = quantize(true[0], cu_q)
    self.k, k_scale = quantize(true[1], cu_k)
    self.scales = dict(q_scale=q_scale, k_scale=k_scale)
    exact_v = None
    if variant == "fp8":
      self.v, self.scales["v_scale"] = quantize(true[2], cu_k)
      exact_v = dequantize(self.v, self.scales["v_scale"], cu_k)
    else:
      self.v = true[2].astype(BF16)
      exact_v = self.v.astype(np.float64)
    self.exact = (dequantize(self.q, q_scale, cu_q), dequantize(self.k, k_scale, cu_k), exact_v)
    self.true = tuple(true)


def rms_error(out, expected):
  out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


def check_dense(rng, variant, *, b=2, sq=40, sk=70, hq=8, hkv=2, d=64, **kw):
  x = Inputs(rng, variant, (b, sq, hq, d), (b, sk, hkv, d), hkv)
  out, lse = jax_fmha.attention(x.q, x.k, x.v, **x.scales, return_lse=True, **kw)
  assert out.dtype == BF16
  expected, expected_lse = ref.dense(*x.exact, **kw)
  assert_attention_close(out, expected, BF16, lse, expected_lse)
  unquantized, _ = ref.dense(*x.true, **kw)
  error = rms_error(out, unquantized)
  print(f"{variant} d{d} {kw}: relative RMS error against the unquantized inputs {error:.4f}")
  assert error <= UNQUANTIZED_RMS


# ---------------------------------------------------------------------------------------
# Attention with FP8 queries
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d", [64, 80, 128, 256])
def test_head_dims(rng, variant, d):
  check_dense(rng, variant, d=d, causal=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
  "sq, sk, kw",
  [
    (40, 70, dict(causal=True)),  # Sq < Sk
    (70, 40, dict(causal=True)),  # Sq > Sk: the first rows see no key
    (64, 64, dict(window=(20, 5))),
    (33, 90, dict(causal=True, softcap=4.0)),
  ],
)
def test_masks_and_softcap(rng, variant, sq, sk, kw):
  check_dense(rng, variant, sq=sq, sk=sk, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hq, hkv", [(8, 2), (32, 1)])
def test_gqa(rng, variant, hq, hkv):
  check_dense(rng, variant, sq=17, sk=100, hq=hq, hkv=hkv, d=128, causal=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_with_empty_sequences(rng, variant):
  """Varlen queries and keys (empty sequences included), scales per sequence from
  quantize_fp8(cu_seqlens=...); rows after the last sequence get 0 and LSE -inf."""
  cu_q = np.asarray([0, 5, 5, 45, 46, 46], np.int32)
  cu_k = np.asarray([0, 30, 30, 60, 160, 160], np.int32)
  x = Inputs(rng, variant, (50, 8, 64), (170, 2, 64), 2, cu_q, cu_k)
  assert x.scales["q_scale"].shape == (5, 2)
  assert (x.scales["q_scale"][[1, 4]] == 1).all()  # empty sequences
  kw = dict(causal=True)
  args = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kw)
  out, lse = jax_fmha.attention(x.q, x.k, x.v, **x.scales, **args)
  expected, expected_lse = ref.packed(*x.exact, cu_q, cu_k, **kw)
  assert_attention_close(out, expected, BF16, lse, expected_lse)
  assert rms_error(out, ref.packed(*x.true, cu_q, cu_k, **kw)[0]) <= UNQUANTIZED_RMS


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_paged_cache(rng, variant, page_size):
  """FP8 queries over a paged e4m3fn cache (per-head scales [Hkv], NaN in every slot no
  sequence owns) with GQA 8/2, chunked-prefill queries, split-KV forced and chosen; the
  FP8-QK variant's values are a bfloat16 cache."""
  lens = [0, 1, page_size + 3, 57]
  k, v8, table, seq_lens, k_scale, v_scale, _, v_true = paged_fp8(
    rng, lens, page_size, 2, 64, "float8_e4m3fn"
  )
  v = v8 if variant == "fp8" else np.where(np.isnan(v8.astype(np.float32)), np.nan, v_true)
  v = v if variant == "fp8" else v.astype(BF16)
  q8, q_scale = (
    np.asarray(a) for a in jax_fmha.quantize_fp8(outlier_normal(rng, (4, 3, 8, 64)), num_kv_heads=2)
  )
  scales = dict(q_scale=q_scale, k_scale=k_scale, v_scale=v_scale if variant == "fp8" else None)
  kv = (dequantize_np(k, k_scale), dequantize_np(v, v_scale) if variant == "fp8" else v)
  expected, expected_lse = ref.paged(dequantize(q8, q_scale), *kv, table, seq_lens, causal=True)
  for num_splits in (None, 1, 3):
    out, lse = jax_fmha.attention(
      q8,
      k,
      v,
      block_table=table,
      seq_lens=seq_lens,
      causal=True,
      num_splits=num_splits,
      return_lse=True,
      **scales,
    )
    assert_attention_close(out, expected, BF16, lse, expected_lse)


@pytest.mark.parametrize("variant", VARIANTS)
def test_split_kv_with_lse(rng, variant):
  """num_splits=3: float32 partials that already hold v_scale, LSEs with q and k scales."""
  x = Inputs(rng, variant, (2, 3, 4, 128), (2, 700, 4, 128), 4)
  out, lse = jax_fmha.attention(x.q, x.k, x.v, **x.scales, num_splits=3, return_lse=True)
  expected, expected_lse = ref.dense(*x.exact)
  assert_attention_close(out, expected, BF16, lse, expected_lse)
  jaxpr = str(
    jax.make_jaxpr(lambda q: jax_fmha.attention(q, x.k, x.v, **x.scales, num_splits=3))(x.q)
  )
  assert "num_splits=3" in jaxpr and "jax_fmha_merge" in jaxpr


def test_append_then_attend(rng):
  """attention_with_kvcache with FP8 queries: bfloat16 new tokens are quantized into the
  FP8 cache with per-sequence scales [B, Hkv], then attended with the history."""
  hkv, d, cached = 2, 64, [5, 0, 33]
  k, v, table, _, _, _, _, _ = paged_fp8(rng, [48] * 3, 16, hkv, d, "float8_e4m3fn")
  k_scale, v_scale = (rng.uniform(0.01, 0.05, (3, hkv)).astype(np.float32) for _ in range(2))
  k_new, v_new = (outlier_normal(rng, (3, 2, hkv, d)).astype(BF16) for _ in range(2))
  q8, q_scale = (
    np.asarray(a)
    for a in jax_fmha.quantize_fp8(outlier_normal(rng, (3, 2, 8, d)), num_kv_heads=hkv)
  )
  out, k2, v2 = jax_fmha.attention_with_kvcache(
    q8,
    k,
    v,
    k_new,
    v_new,
    cache_seqlens=np.asarray(cached, np.int32),
    block_table=table,
    q_scale=q_scale,
    k_scale=k_scale,
    v_scale=v_scale,
    out_dtype=jnp.float32,
    causal=True,
  )
  assert out.dtype == np.float32
  q = dequantize(q8, q_scale)
  for b in range(3):
    keys, values = (
      np.concatenate(
        [ref.gather_pages(x, table[b], cached[b]), quantize_np(new[b], s[b], "float8_e4m3fn")]
      )
      for x, new, s in ((k, k_new, k_scale), (v, v_new, v_scale))
    )
    expected, _ = ref.attend_sequence(
      q[b], dequantize_np(keys, k_scale[b]), dequantize_np(values, v_scale[b]), causal=True
    )
    assert_close(np.asarray(out)[b], expected, rtol=1e-5, atol=2e-5, what=f"sequence {b}")
  k3, v3 = jax_fmha.update_kv_cache(
    k, v, k_new, v_new, table, np.asarray(cached, np.int32), k_scale=k_scale, v_scale=v_scale
  )
  assert_same_fp8(k2, k3)
  assert_same_fp8(v2, v3)


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
def test_out_dtype_and_the_reference_backend(rng, out_dtype):
  """out_dtype sets the output dtype; backend='reference' dequantizes and agrees with the
  kernel to float32 rounding (float32 output), or to the output's rounding."""
  x = Inputs(rng, "fp8", (2, 9, 4, 64), (2, 50, 2, 64), 2)
  call = lambda backend: jax_fmha.attention(
    x.q,
    x.k,
    x.v,
    **x.scales,
    causal=True,
    out_dtype=out_dtype,
    return_lse=True,
    backend=backend,
  )
  (out, lse), (expected, expected_lse) = call("auto"), call("reference")
  assert out.dtype == expected.dtype == FLOAT_DTYPES[out_dtype]
  tol = dict(rtol=1e-5, atol=2e-5) if out_dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
  assert_close(out, expected, **tol)
  assert_close(lse, expected_lse, rtol=2e-6, atol=2e-5, what="lse")
  exact_out, _ = ref.dense(*x.exact, causal=True)
  assert_attention_close(out, exact_out, FLOAT_DTYPES[out_dtype])


def test_float16_values(rng):
  """FP8 queries and keys with float16 values (P V in float16's compute type)."""
  x = Inputs(rng, "fp8_qk", (2, 9, 4, 64), (2, 50, 2, 64), 2)
  v = x.true[2].astype(np.float16)
  out = jax_fmha.attention(x.q, x.k, v, **x.scales, causal=True, out_dtype=jnp.float16)
  expected, _ = ref.dense(x.exact[0], x.exact[1], v, causal=True)
  assert_attention_close(out, expected, FLOAT_DTYPES["float16"])


# ---------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------


def test_scales_broadcast(rng):
  """A Python float, a float32 scalar, [Hkv] and [B, Hkv] of one value agree bit for bit."""
  x = Inputs(rng, "fp8", (3, 5, 4, 32), (3, 20, 2, 32), 2)
  call = lambda s: np.asarray(jax_fmha.attention(x.q, x.k, x.v, q_scale=s, k_scale=s, v_scale=s))
  as_float = call(0.03)
  for same in (np.float32(0.03), np.full(2, 0.03, np.float32), jnp.full((3, 2), 0.03, jnp.float32)):
    np.testing.assert_array_equal(call(same), as_float)


def test_per_sequence_scales(rng):
  """Different scales per sequence: each sequence's rows equal a call on that sequence
  alone with its scales, and the reference over the inputs dequantized per sequence."""
  x = Inputs(rng, "fp8", (3, 6, 4, 64), (3, 40, 2, 64), 2)
  scales = {
    name: s * rng.uniform(0.5, 2.0, s.shape).astype(np.float32) for name, s in x.scales.items()
  }
  out = np.asarray(jax_fmha.attention(x.q, x.k, x.v, **scales, causal=True))
  for b in range(3):
    alone = jax_fmha.attention(
      x.q[b : b + 1],
      x.k[b : b + 1],
      x.v[b : b + 1],
      **{n: s[b] for n, s in scales.items()},
      causal=True,
    )
    np.testing.assert_array_equal(out[b], np.asarray(alone)[0])
  exact = (
    dequantize(a, scales[n]) for a, n in ((x.q, "q_scale"), (x.k, "k_scale"), (x.v, "v_scale"))
  )
  expected, _ = ref.dense(*exact, causal=True)
  assert_attention_close(out, expected, BF16)
  unscaled, _ = ref.dense(*x.exact, causal=True)
  assert rms_error(out, unscaled) > 0.1  # the scales changed the result


def test_update_with_per_sequence_scales(rng):
  """update_kv_cache with [B, Hkv] scales: sequence b's tokens of KV head h are quantized
  with scale[b, h], in both backends, bit for bit."""
  cache = jnp.zeros((3, 8, 2, 16), jnp.float8_e4m3fn)
  new = outlier_normal(rng, (3, 2, 2, 16))
  k_scale = rng.uniform(0.01, 0.2, (3, 2)).astype(np.float32)
  lens = np.asarray([0, 3, 6], np.int32)
  for backend in ("auto", "reference"):
    k, _ = jax_fmha.update_kv_cache(
      cache, cache, new, new, None, lens, k_scale=k_scale, v_scale=1.0, backend=backend
    )
    for b in range(3):
      assert_same_fp8(
        np.asarray(k)[b, lens[b] : lens[b] + 2], quantize_np(new[b], k_scale[b], "float8_e4m3fn")
      )


def test_vmap_folds_scales_with_the_batch(rng):
  """vmap over FP8 queries with per-element q_scale folds into one call (the scales join
  the batch) and equals the per-element calls."""
  x = Inputs(rng, "fp8", (2, 4, 4, 32), (2, 30, 2, 32), 2)
  qs = np.stack([x.q, x.q[::-1]])
  q_scales = np.stack([x.scales["q_scale"], 2 * x.scales["q_scale"]])
  attend = lambda q, q_scale: jax_fmha.attention(
    q,
    x.k,
    x.v,
    q_scale=q_scale,
    k_scale=x.scales["k_scale"],
    v_scale=x.scales["v_scale"],
    num_splits=1,
  )
  batched = jax.vmap(attend)
  jaxpr = str(jax.make_jaxpr(batched)(qs, q_scales))
  assert jaxpr.count("jax_fmha_attention_fwd") == 1 and "while" not in jaxpr
  out = batched(qs, q_scales)
  for n in range(2):
    np.testing.assert_array_equal(out[n], attend(qs[n], q_scales[n]))


# ---------------------------------------------------------------------------------------
# quantize_fp8
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FP8))
def test_quantize_fp8_dense(rng, fmt):
  """scale[b, h] = amax over (S, the heads of KV head h, D) / fp8_max (1 for zeros),
  infinities saturating to +-amax, NaN kept: quantize_kv's rule per sequence and group."""
  x = outlier_normal(rng, (3, 7, 4, 16))
  x[1] = 0.0  # a sequence of zeros: scale 1
  x[0, 0, 0, :3] = [np.inf, -np.inf, np.nan]
  x8, scale = jax_fmha.quantize_fp8(x, num_kv_heads=2, dtype=FP8[fmt])
  assert x8.shape == x.shape and x8.dtype == FP8[fmt] and scale.shape == (3, 2)
  finite = np.where(np.isfinite(x), np.abs(x), 0).reshape(3, 7, 2, 2, 16)
  amax = finite.max(axis=(1, 3, 4))
  want = np.where(amax > 0, amax / fp8_max(fmt), 1.0)
  np.testing.assert_allclose(np.asarray(scale), want, rtol=2e-7)
  for b in range(3):  # quantize_kv's bytes over one sequence's [S, Hkv, group * D]
    group_rows = x[b].reshape(7, 2, 32)
    kv8, kv_scale = jax_fmha.quantize_kv(group_rows, FP8[fmt])
    np.testing.assert_array_equal(np.asarray(scale)[b], np.asarray(kv_scale))
    assert_same_fp8(np.asarray(x8)[b].reshape(7, 2, 32), kv8)
  back = dequantize(x8, scale).astype(np.float32)
  np.testing.assert_allclose(back[0, 0, 0, :2], [amax[0, 0], -amax[0, 0]], rtol=1e-6)
  assert np.isnan(back[0, 0, 0, 2])


def test_quantize_fp8_packed(rng):
  """Packed rows with cu_seqlens: per-sequence scales (empty sequences 1), rows outside
  every sequence quantized with scale 1; the same bytes as the dense form per sequence."""
  cu = np.asarray([2, 7, 7, 19], np.int32)
  x = outlier_normal(rng, (21, 4, 16))
  x8, scale = jax_fmha.quantize_fp8(x, num_kv_heads=1, cu_seqlens=cu)
  assert scale.shape == (3, 1) and scale[1, 0] == 1.0
  for b in (0, 2):
    dense8, dense_scale = jax_fmha.quantize_fp8(x[None, cu[b] : cu[b + 1]], num_kv_heads=1)
    np.testing.assert_array_equal(np.asarray(scale)[b], np.asarray(dense_scale)[0])
    assert_same_fp8(np.asarray(x8)[cu[b] : cu[b + 1]], np.asarray(dense8)[0])
  outside = np.r_[0:2, 19:21]
  assert_same_fp8(
    np.asarray(x8)[outside], quantize_np(x[outside], np.ones(4, np.float32), "float8_e4m3fn")
  )


# ---------------------------------------------------------------------------------------
# NaN, poison, gradients, the GPU lowering
# ---------------------------------------------------------------------------------------


def test_nan_query_stays_in_its_row(rng):
  """A NaN FP8 query element makes its own row and head NaN; no other output."""
  x = Inputs(rng, "fp8", (2, 3, 4, 32), (2, 16, 2, 32), 2)
  q = x.q.copy()
  q[1, 2, 3, 5] = np.nan
  out = np.asarray(jax_fmha.attention(q, x.k, x.v, **x.scales)).astype(np.float32)
  nan = np.isnan(out)
  assert nan[1, 2, 3].all() and nan.sum() == out.shape[-1]


def test_grad_raises(rng):
  x = Inputs(rng, "fp8_qk", (1, 2, 2, 16), (1, 8, 1, 16), 1)
  loss = lambda v: jax_fmha.attention(x.q, x.k, v, **x.scales).astype(jnp.float32).sum()
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(loss)(jnp.asarray(x.v))


def _export_for_cuda(monkeypatch, fn, *args):
  """Lowers fn for CUDA (CUDA handlers pretended present, so that a CPU-only build checks
  the trace-time rules); returns the module's text."""
  monkeypatch.setattr(jax_fmha._ffi, "has_target", lambda target, platform: True)
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in jax_fmha.FFI_TARGETS]
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
  return exported.mlir_module()


def test_fp8_queries_refused_without_the_hopper_kernel(monkeypatch):
  """FP8 queries for CUDA from a build without the sm_90a kernel: a clear TypeError at trace
  time; FP8 K/V with bfloat16 q still lower."""
  monkeypatch.setattr(jax_fmha._ffi, "hopper_kernel_built", lambda: False)
  q8 = jnp.zeros((1, 1, 2, 64), jnp.float8_e4m3fn)
  k8 = jnp.zeros((1, 8, 2, 64), jnp.float8_e4m3fn)
  with pytest.raises(
    TypeError,
    match=r"^q: FP8 queries need the sm_90a kernel \(a Hopper GPU and a build with 90a\)",
  ):
    _export_for_cuda(monkeypatch, lambda q, k: jax_fmha.attention(q, k, k, q_scale=1.0), q8, k8)
  text = _export_for_cuda(
    monkeypatch, lambda q, k: jax_fmha.attention(q, k, k), q8.astype(jnp.bfloat16), k8
  )
  assert "jax_fmha_attention_fwd" in text


def test_fp8_queries_lower_for_the_hopper_kernel(monkeypatch):
  """With the sm_90a kernel built: e4m3fn q and k with 16-bit or e4m3fn v (FP8 P V) lower to
  the custom call (in every output dtype, split too); e5m2 q, head dims that are not a
  multiple of 16 and pages that are not a multiple of 16 keys are refused at trace time."""
  monkeypatch.setattr(jax_fmha._ffi, "hopper_kernel_built", lambda: True)
  q8 = jnp.zeros((1, 4, 2, 64), jnp.float8_e4m3fn)
  k8 = jnp.zeros((1, 8, 2, 64), jnp.float8_e4m3fn)
  v = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  for v_any in (v, k8):
    for out_dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
      for splits in (1, 2):
        scales = dict(q_scale=0.5, k_scale=2.0)
        if v_any.dtype == k8.dtype:
          scales["v_scale"] = 4.0
        text = _export_for_cuda(
          monkeypatch,
          lambda q, k, v, out_dtype=out_dtype, splits=splits, scales=scales: jax_fmha.attention(
            q, k, v, **scales, out_dtype=out_dtype, num_splits=splits
          ),
          q8,
          k8,
          v_any,
        )
        assert "jax_fmha_attention_fwd" in text
  attend = lambda q, k, v: jax_fmha.attention(q, k, v, q_scale=1.0)
  with pytest.raises(TypeError, match=r"^q: FP8 queries on the GPU are float8_e4m3fn"):
    e5 = lambda x: x.astype(jnp.float8_e5m2)
    _export_for_cuda(monkeypatch, attend, e5(q8), e5(k8), v)
  with pytest.raises(TypeError, match=r"^q: FP8 queries on the GPU are float8_e4m3fn"):
    _export_for_cuda(monkeypatch, attend, e5(q8), e5(k8), e5(k8))
  with pytest.raises(ValueError, match=r"^q: FP8 queries on the GPU need head_dim a multiple"):
    _export_for_cuda(monkeypatch, attend, q8[..., :40], k8[..., :40], v[..., :40])
  pages_k = jnp.zeros((4, 8, 2, 64), jnp.float8_e4m3fn)
  pages_v = jnp.zeros((4, 8, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"^k: FP8 queries on the GPU need pages of a multiple"):
    _export_for_cuda(
      monkeypatch,
      lambda q, k, v: jax_fmha.attention_with_kvcache(
        q,
        k,
        v,
        cache_seqlens=jnp.array([8], jnp.int32),
        block_table=jnp.array([[0, 1]]),
        q_scale=1.0,
      ),
      q8,
      pages_k,
      pages_v,
    )


# ---------------------------------------------------------------------------------------
# Bad input: clear errors at trace time, naming the argument
# ---------------------------------------------------------------------------------------


def _args(**change):
  args = dict(
    q=jnp.zeros((2, 1, 4, 64), jnp.float8_e4m3fn),
    k=jnp.zeros((2, 16, 2, 64), jnp.float8_e4m3fn),
    v=jnp.zeros((2, 16, 2, 64), jnp.float8_e4m3fn),
    q_scale=jnp.ones((2, 2), jnp.float32),
  )
  args.update(change)
  return args


@pytest.mark.parametrize(
  "change, error, match",
  [
    (
      dict(k=jnp.zeros((2, 16, 2, 64), jnp.bfloat16)),
      TypeError,
      r"^k: FP8 q \(float8_e4m3fn\) needs k of the same FP8 format, got bfloat16",
    ),
    (
      dict(k=jnp.zeros((2, 16, 2, 64), jnp.float8_e5m2)),
      TypeError,
      r"^k: FP8 q \(float8_e4m3fn\) needs k of the same FP8 format, got float8_e5m2",
    ),
    (
      dict(v=jnp.zeros((2, 16, 2, 64), jnp.float32)),
      TypeError,
      r"^v: with FP8 q and k \(float8_e4m3fn\) expected v of dtype float8_e4m3fn, bfloat16 or "
      r"float16 \(P V in that dtype\), got float32",
    ),
    (
      dict(q_scale=None),
      TypeError,
      r"^q_scale: FP8 q \(float8_e4m3fn\) needs its dequantization scale",
    ),
    (
      dict(
        q=jnp.zeros((2, 1, 4, 64), jnp.bfloat16),
        k=jnp.zeros((2, 16, 2, 64), jnp.bfloat16),
        v=jnp.zeros((2, 16, 2, 64), jnp.bfloat16),
      ),
      ValueError,
      r"^q_scale: dequantization scales are for FP8 q \(float8_e4m3fn, float8_e5m2\), got q of "
      r"dtype bfloat16: drop q_scale",
    ),
    (
      dict(q_scale=jnp.ones((2, 4), jnp.float32)),
      ValueError,
      r"^q_scale: expected a scalar, shape \[Hkv=2\] \(one scale per KV head\) or \[B=2, Hkv=2\] "
      r"\(per sequence and KV head\), got shape \(2, 4\)",
    ),
    (
      dict(k_scale=jnp.ones((3, 2), jnp.float32)),
      ValueError,
      r"^k_scale: expected a scalar, shape \[Hkv=2\].*got shape \(3, 2\)",
    ),
    (
      dict(v_scale=np.ones((2, 2), np.float64)),
      TypeError,
      r"^v_scale: expected float32 \(a Python float or a float32 array\), got float64",
    ),
    (
      dict(v=jnp.zeros((2, 16, 2, 64), jnp.bfloat16), v_scale=1.0),
      ValueError,
      r"^v_scale: dequantization scales are for FP8 v .*got v of dtype bfloat16: drop v_scale",
    ),
    (
      dict(out_dtype=jnp.float8_e4m3fn),
      TypeError,
      r"^out_dtype: expected bfloat16 \(the default for FP8 q\), float16 or float32, got "
      r"float8_e4m3fn",
    ),
    (
      dict(
        q=jnp.zeros((2, 1, 4, 64), jnp.bfloat16),
        k=jnp.zeros((2, 16, 2, 64), jnp.bfloat16),
        v=jnp.zeros((2, 16, 2, 64), jnp.bfloat16),
        q_scale=None,
        out_dtype=jnp.float32,
      ),
      TypeError,
      r"^out_dtype: only for FP8 q \(the output has q's dtype otherwise\): expected None or "
      r"bfloat16, got float32",
    ),
  ],
)
def test_bad_input(change, error, match):
  for backend in ("auto", "reference"):
    with pytest.raises(error, match=match):
      jax_fmha.attention(**_args(**change), backend=backend)


@pytest.mark.parametrize(
  "args, kwargs, error, match",
  [
    (
      (np.zeros((2, 3, 4, 8), np.float32),),
      dict(num_kv_heads=3),
      ValueError,
      r"^num_kv_heads: expected a divisor of x's 4 heads, got 3",
    ),
    (
      (np.zeros((3, 4, 8), np.float32),),
      {},
      ValueError,
      r"^x: expected rank 4 \(dense \[B, S, H, D\]; packed \[T, H, D\] needs cu_seqlens\)",
    ),
    (
      (np.zeros((2, 3, 4, 8), np.float32),),
      dict(cu_seqlens=[0, 2]),
      ValueError,
      r"^x: expected rank 3 \(packed \[T, H, D\] with cu_seqlens; dense x is rank 4\)",
    ),
    (
      (np.zeros((2, 3, 4, 8), np.float32),),
      dict(dtype=jnp.int8),
      TypeError,
      r"^dtype: expected float8_e4m3fn or float8_e5m2, got int8",
    ),
    (
      (np.zeros((2, 3, 4, 8), ml_dtypes.float8_e4m3fn),),
      {},
      TypeError,
      r"^x: expected dtype float32, bfloat16 or float16, got float8_e4m3fn",
    ),
  ],
)
def test_quantize_fp8_bad_input(args, kwargs, error, match):
  with pytest.raises(error, match=match):
    jax_fmha.quantize_fp8(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# The error model (docs/design/fp8_attention.md)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_error_table_d128(rng, variant):
  """The kernel's relative error at d128 (GQA 8/2, causal, Sq 128, Sk 512) against the
  float64 reference over the dequantized inputs (its own error: within bfloat16's output
  rounding) and over the unquantized inputs (what FP8 costs), as tabulated in the doc."""
  x = Inputs(rng, variant, (2, 128, 8, 128), (2, 512, 2, 128), 2)
  out = jax_fmha.attention(x.q, x.k, x.v, **x.scales, causal=True, out_dtype=jnp.float32)
  exact, _ = ref.dense(*x.exact, causal=True)
  unquantized, _ = ref.dense(*x.true, causal=True)
  kernel, fp8 = rms_error(out, exact), rms_error(out, unquantized)
  worst = np.abs(np.asarray(out) - unquantized).max() / np.abs(unquantized).max()
  print(
    f"{variant} d128: relative RMS error {kernel:.2e} (dequantized), {fp8:.4f} "
    f"(unquantized), max {worst:.4f}"
  )
  assert kernel <= 1e-6 and fp8 <= UNQUANTIZED_RMS
