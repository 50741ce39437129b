"""Pure-JAX reference implementations: the same semantics as the kernels, written for
clarity (they materialize the full score matrix). ``backend="reference"`` runs these."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _segments(cu_seqlens, rows):
  """Per packed row: (sequence id or -1, position in the sequence, sequence length)."""
  idx = jnp.arange(rows)
  seg = jnp.searchsorted(cu_seqlens, idx, side="right") - 1
  inside = (seg >= 0) & (seg < cu_seqlens.shape[0] - 1)
  seg_c = jnp.clip(seg, 0, cu_seqlens.shape[0] - 2)
  pos = idx - cu_seqlens[seg_c]
  length = cu_seqlens[seg_c + 1] - cu_seqlens[seg_c]
  return jnp.where(inside, seg_c, -1), pos, length


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


def _softmax_attend(s, mask, v):
  """s [..., H, Sq, Sk] float32 scores, mask broadcastable, v [..., Sk, H, D] float32."""
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("...hqk,...khd->...qhd", p / jnp.where(l > 0, l, 1.0), v,
                   precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)) + m[..., 0],
                  -jnp.inf)
  return out, lse


def attention(q, k, v, *, scale: float, softcap: float = 0.0, window=(-1, -1),
              cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None):
  """Reference attention on validated, canonical arguments (see ``jax_fmha.attention``;
  ``causal`` is already folded into ``window[1] = 0``). Returns ``(out, lse)``."""
  group = q.shape[-2] // k.shape[-2]
  kf = jnp.repeat(k.astype(jnp.float32), group, axis=-2)
  vf = jnp.repeat(v.astype(jnp.float32), group, axis=-2)
  s = jnp.einsum("...qhd,...khd->...hqk", q.astype(jnp.float32), kf,
                 precision=jax.lax.Precision.HIGHEST) * scale
  if softcap > 0:
    s = softcap * jnp.tanh(s / softcap)
  if cu_seqlens_q is None:  # dense
    sq, sk = q.shape[1], k.shape[1]
    mask = _visible(jnp.arange(sq)[:, None], jnp.arange(sk)[None, :], sq, sk, window)
    out, lse = _softmax_attend(s, mask, vf)
    return out.astype(q.dtype), lse
  q_seg, q_pos, q_len = _segments(cu_seqlens_q, q.shape[0])
  k_seg, k_pos, k_len = _segments(cu_seqlens_k, k.shape[0])
  mask = (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] >= 0)
  mask &= _visible(q_pos[:, None], k_pos[None, :], q_len[:, None], k_len[None, :], window)
  out, lse = _softmax_attend(s, mask, vf)
  if max_seqlen_q is not None:  # sequences longer than the static bound are not computed
    too_long = (q_seg >= 0) & (q_len > max_seqlen_q)
    out = jnp.where(too_long[:, None, None], jnp.nan, out)
    lse = jnp.where(too_long[None, :], jnp.nan, lse)
  return out.astype(q.dtype), lse
