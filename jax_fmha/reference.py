"""Pure-JAX reference implementations: the same semantics as the kernels, written for
clarity (they materialize the full score matrix). ``backend="reference"`` runs these."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_fmha._validation import KvLayout

_HIGHEST = jax.lax.Precision.HIGHEST


def dequantize_fp8(x, scale):
  """FP8 ``x [..., Hkv, D]`` as float32: ``x * scale``, with ``scale`` broadcasting against
  ``x``'s axes before D (``[Hkv]``: one per KV head; ``[B, 1, Hkv]`` for dense
  ``[B, S, Hkv, D]``: per sequence and KV head)."""
  return x.astype(jnp.float32) * scale[..., None]


def quantize_fp8(x, scale, dtype):
  """``x [..., Hkv, D]`` in FP8 ``dtype`` with scales broadcasting against its axes before
  D (as ``dequantize_fp8``'s): ``x / scale`` computed as ``x * (1 / scale)`` in float32,
  rounded to nearest even; magnitudes past the largest finite FP8 value (infinities too)
  saturate to it, NaN stays NaN."""
  fp8_max = float(jnp.finfo(dtype).max)
  scaled = x.astype(jnp.float32) * (1.0 / scale)[..., None]
  return jnp.clip(scaled, -fp8_max, fp8_max).astype(dtype)


def _segments(cu_seqlens, rows):
  """Per packed row: (sequence id or -1, position in the sequence, sequence length)."""
  idx = jnp.arange(rows)
  seg = jnp.searchsorted(cu_seqlens, idx, side="right") - 1
  inside = (seg >= 0) & (seg < cu_seqlens.shape[0] - 1)
  seg_c = jnp.clip(seg, 0, cu_seqlens.shape[0] - 2)
  pos = idx - cu_seqlens[seg_c]
  length = cu_seqlens[seg_c + 1] - cu_seqlens[seg_c]
  return jnp.where(inside, seg_c, -1), pos, length


def _row_scales(scale, seg):
  """Per packed row (sequence ids `seg`, -1 outside every sequence) its sequence's scales
  ``scale[seg]`` from ``[B, ...]``; 1 for rows outside every sequence."""
  ones = jnp.ones((1,) + scale.shape[1:], scale.dtype)
  return jnp.concatenate([scale, ones])[jnp.where(seg >= 0, seg, scale.shape[0])]


def _rows_valid(cu_seqlens, rows, max_len):
  first, last = cu_seqlens[:-1], cu_seqlens[1:]
  return (first >= 0) & (last >= first) & (last <= rows) & (last - first <= max_len)


def _padded_kv(k, v, kv_layout: KvLayout, cu_seqlens_k, seq_lens, block_table):
  """Keys and values as [B, S, Hkv, D] with lengths [B] and validity [B] (see attention)."""
  if kv_layout == "uniform":
    lens = jnp.full((k.shape[0],), k.shape[1], jnp.int32)
    return k, v, lens, jnp.ones(lens.shape, bool)
  if kv_layout == "packed":
    idx = jnp.clip(cu_seqlens_k[:-1, None] + jnp.arange(k.shape[0])[None, :], 0, k.shape[0] - 1)
    lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    return k[idx], v[idx], lens, _rows_valid(cu_seqlens_k, k.shape[0], k.shape[0])
  if kv_layout == "cache":
    return k, v, seq_lens, (seq_lens >= 0) & (seq_lens <= k.shape[1])
  page_size = k.shape[1]
  ids = jnp.clip(block_table, 0, k.shape[0] - 1)
  # jnp.asarray: NumPy pages indexed by a traced table must be gathered by jax.
  gather = lambda x: jnp.asarray(x)[ids].reshape((ids.shape[0], -1) + x.shape[2:])
  page_used = jnp.arange(block_table.shape[1])[None, :] * page_size < seq_lens[:, None]
  page_ok = (block_table >= 0) & (block_table < k.shape[0])
  valid = (seq_lens >= 0) & (seq_lens <= block_table.shape[1] * page_size)
  valid &= jnp.all(page_ok | ~page_used, axis=1)
  return gather(k), gather(v), seq_lens, valid


def _visible(q_pos, k_pos, q_len, k_len, window):
  """Bottom-right aligned causal/window mask for broadcastable position arrays."""
  diag = q_pos + k_len - q_len
  left, right = window
  ok = (k_pos >= 0) & (k_pos < k_len)
  if left >= 0:
    ok &= k_pos >= diag - left
  if right >= 0:
    ok &= k_pos <= diag + right
  return ok


def _softmax(s, mask):
  """Masked softmax of float32 scores: (probabilities, LSE); empty rows -> 0 and -inf."""
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m, -jnp.inf)[..., 0]
  return p / jnp.where(l > 0, l, 1.0), lse


def attention(
  q,
  k,
  v,
  *,
  scale: float,
  softcap: float = 0.0,
  window=(-1, -1),
  kv_layout: KvLayout = "uniform",
  cu_seqlens_q=None,
  cu_seqlens_k=None,
  seq_lens=None,
  block_table=None,
  max_seqlen_q=None,
  q_scale=None,
  k_scale=None,
  v_scale=None,
  out_dtype=None,
):
  """Reference attention on validated, canonical arguments (see ``jax_fmha.attention``;
  ``causal`` is already folded into ``window[1] = 0``). ``kv_layout`` says which keys are
  given: ``"uniform"`` (dense), ``"packed"`` (with ``cu_seqlens_k``), ``"cache"`` (with
  ``seq_lens``) or ``"paged"`` (with ``block_table`` and ``seq_lens``). FP8 q, k and v come
  with float32 ``[B, Hkv]`` scales ``q_scale``, ``k_scale``, ``v_scale``: the attention is
  over their dequantized values. The output has ``out_dtype`` (default q's dtype).
  Returns ``(out, lse)``."""
  out_dtype = q.dtype if out_dtype is None else out_dtype
  kd, vd, k_len, kv_ok = _padded_kv(k, v, kv_layout, cu_seqlens_k, seq_lens, block_table)
  if k_scale is not None:  # kd, vd: [B, S, Hkv, D]
    kd = dequantize_fp8(kd, k_scale[:, None])
  if v_scale is not None:
    vd = dequantize_fp8(vd, v_scale[:, None])
  group = q.shape[-2] // k.shape[-2]
  kd = jnp.repeat(kd.astype(jnp.float32), group, axis=2)  # [B, S, Hq, D]
  vd = jnp.repeat(vd.astype(jnp.float32), group, axis=2)
  qf = q.astype(jnp.float32)
  if q_scale is not None:  # query head h has the scale of KV head h // group
    q_scale = jnp.repeat(q_scale, group, axis=1)  # [B, Hq]
    if cu_seqlens_q is None:
      qf = dequantize_fp8(q, q_scale[:, None])
    else:
      qf = dequantize_fp8(q, _row_scales(q_scale, _segments(cu_seqlens_q, q.shape[0])[0]))
  k_pos = jnp.arange(kd.shape[1])
  # Values past a sequence's keys are never read (their probability is 0, but NaN * 0 is
  # NaN): whatever the unused slots of a cache hold cannot reach the output.
  vd = jnp.where((k_pos[None, :] < k_len[:, None])[:, :, None, None], vd, 0.0)
  transform = lambda s: softcap * jnp.tanh(s / softcap) if softcap > 0 else s

  if cu_seqlens_q is None:  # dense queries [B, Sq, Hq, D]
    sq = q.shape[1]
    s = transform(jnp.einsum("bqhd,bkhd->bhqk", qf, kd, precision=_HIGHEST) * scale)
    mask = _visible(
      jnp.arange(sq)[None, None, :, None],
      k_pos[None, None, None, :],
      sq,
      k_len[:, None, None, None],
      window,
    )
    p, lse = _softmax(s, mask)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vd, precision=_HIGHEST)
    bad = ~kv_ok
    out = jnp.where(bad[:, None, None, None], jnp.nan, out)
    lse = jnp.where(bad[:, None, None], jnp.nan, lse)
    return out.astype(out_dtype), lse

  # Packed queries [Tq, Hq, D]: every row against every sequence's keys, masked to its own.
  seg, q_pos, q_len = _segments(cu_seqlens_q, q.shape[0])
  s = transform(jnp.einsum("thd,bkhd->bhtk", qf, kd, precision=_HIGHEST) * scale)
  mask = (seg[None, :] == jnp.arange(kd.shape[0])[:, None])[:, None, :, None]
  mask &= _visible(
    q_pos[None, None, :, None],
    k_pos[None, None, None, :],
    q_len[None, None, :, None],
    k_len[:, None, None, None],
    window,
  )
  p, lse = _softmax(s, mask)
  out = jnp.einsum("bhtk,bkhd->thd", p, vd, precision=_HIGHEST)
  lse = jnp.max(jnp.where(mask.any(-1), lse, -jnp.inf), axis=0)  # the row's own sequence
  q_ok = _rows_valid(
    cu_seqlens_q, q.shape[0], max_seqlen_q if max_seqlen_q is not None else q.shape[0]
  )
  bad = (seg >= 0) & ~(q_ok & kv_ok)[jnp.clip(seg, 0)]
  out = jnp.where(bad[:, None, None], jnp.nan, out)
  lse = jnp.where(bad[None, :], jnp.nan, lse)
  return out.astype(out_dtype), lse


def merge_attention_states(outs, lses):
  """Reference merge of float32 partial results ``outs [S, ..., D]``, ``lses [S, ...]``."""
  m = jnp.max(lses, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lses - m_safe)
  total = jnp.sum(w, axis=0)
  out = jnp.sum(w[..., None] * outs, axis=0) / jnp.where(total > 0, total, 1.0)[..., None]
  lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m_safe, -jnp.inf)
  lse = jnp.where(jnp.isnan(m), jnp.nan, lse)
  return out, lse


def update_kv_cache(
  k_cache,
  v_cache,
  k_new,
  v_new,
  block_table,
  cache_seqlens,
  cu_seqlens_new=None,
  *,
  k_scale=None,
  v_scale=None,
):
  """Reference cache append (see ``jax_fmha.update_kv_cache``): a masked scatter. FP8
  caches come with float32 ``[B, Hkv]`` scales: the new tokens are quantized first, each
  with its sequence's."""
  k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)  # NumPy caches have no .at
  if cu_seqlens_new is None:  # dense [B, S_new, H, D] -> packed rows with uniform starts
    b, s_new = k_new.shape[:2]
    cu_seqlens_new = jnp.arange(b + 1, dtype=jnp.int32) * s_new
    k_new, v_new = (x.reshape((-1,) + x.shape[2:]) for x in (k_new, v_new))
  seg, pos, _ = _segments(cu_seqlens_new, k_new.shape[0])
  if k_scale is not None:
    k_new = quantize_fp8(k_new, _row_scales(k_scale, seg), k_cache.dtype)
    v_new = quantize_fp8(v_new, _row_scales(v_scale, seg), v_cache.dtype)
  seg_c = jnp.clip(seg, 0)
  dest = cache_seqlens[seg_c] + pos
  ok = (seg >= 0) & (cache_seqlens[seg_c] >= 0)
  ok &= _rows_valid(cu_seqlens_new, k_new.shape[0], k_new.shape[0])[seg_c]
  if block_table is None:  # contiguous [B, S_max, H, D]
    ok &= dest < k_cache.shape[1]
    row = seg_c * k_cache.shape[1] + dest
  else:
    page_size = k_cache.shape[1]
    ok &= dest < block_table.shape[1] * page_size
    page = block_table[seg_c, jnp.clip(dest // page_size, 0, block_table.shape[1] - 1)]
    ok &= (page >= 0) & (page < k_cache.shape[0])
    row = page * page_size + dest % page_size
  rows = k_cache.shape[0] * k_cache.shape[1]
  row = jnp.where(ok, row, rows)  # out of range: dropped by the scatter
  scatter = lambda cache, new: (
    cache.reshape((rows,) + cache.shape[2:]).at[row].set(new, mode="drop").reshape(cache.shape)
  )
  return scatter(k_cache, k_new), scatter(v_cache, v_new)


# ---------------------------------------------------------------------------------------
# MLP: GLU activations and RMSNorm (see jax_fmha.mlp); float32 arithmetic, one rounding
# to the input dtype at the end.
# ---------------------------------------------------------------------------------------


def swiglu(gate, up):
  """silu(gate) * up."""
  f32 = jnp.float32
  return (jax.nn.silu(gate.astype(f32)) * up.astype(f32)).astype(gate.dtype)


def geglu(gate, up, approximate: bool = True):
  """gelu(gate) * up; the tanh approximation of gelu when `approximate`, else erf."""
  f32 = jnp.float32
  gelu = jax.nn.gelu(gate.astype(f32), approximate=approximate)
  return (gelu * up.astype(f32)).astype(gate.dtype)


def rms_norm(x, weight, eps: float = 1e-6, weight_offset: float = 0.0):
  """x * rsqrt(mean(x^2) + eps) * (weight + weight_offset) over the last axis."""
  xf = x.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * inv_rms * (weight.astype(jnp.float32) + weight_offset)).astype(x.dtype)


def rms_norm_residual(x, residual, weight, eps: float = 1e-6, weight_offset: float = 0.0):
  """(rms_norm(h), h) with h = x + residual rounded to x's dtype."""
  h = (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(x.dtype)
  return rms_norm(h, weight, eps, weight_offset), h
