"""FP8 quantization with amax scales: of a KV cache per KV head (``quantize_kv``), and of
attention inputs per sequence and KV head (``quantize_fp8``). Pure JAX, any device.

Both share one rule (docs/design/fp8_kv_cache.md, "quantize_kv and the error model"): the
scale of a slice is its largest finite magnitude over the format's largest value (1 where
that is 0 or below float32's smallest normal), and the values are quantized as
``update_kv_cache`` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jax_fmha import _validation, reference


def _finite_magnitudes(x):
  """|x| in float32, 0 for infinities and NaN (they do not set the scale)."""
  return jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)


def _amax_scale(amax, dtype):
  """The scale that maps `amax` onto the largest FP8 value; 1 for (near) zero amax. A
  product with the float32 reciprocal, not a division: XLA rewrites a division by a
  constant into that product in some fusions only, and programs would disagree by an ulp."""
  scale = amax * np.float32(1 / float(jnp.finfo(dtype).max))
  return jnp.where(scale >= jnp.finfo(jnp.float32).tiny, scale, 1.0)


def _float_input(name: str, x, min_rank: int, meaning: str):
  x = _validation.array(name, x)
  _validation.float_dtype(name, x)
  if x.ndim < min_rank:
    raise ValueError(f"{name}: expected rank >= {min_rank} ({meaning}), got shape {tuple(x.shape)}")
  return x


def quantize_kv(
  cache: ArrayLike, dtype: DTypeLike = jnp.float8_e4m3fn
) -> tuple[jax.Array, jax.Array]:
  """Quantizes keys or values to FP8 with one scale per KV head: ``(cache_fp8, scale)``.

  Args:
    cache: float32, bfloat16 or float16 ``[..., Hkv, D]``: any layout of ``attention``'s
      keys or values (pages, a contiguous cache, dense, packed). Quantize K and V apart.
    dtype: ``float8_e4m3fn`` (default; 3 mantissa bits, largest value 448) or
      ``float8_e5m2`` (2 mantissa bits, largest value 57344).

  Returns:
    ``scale`` float32 ``[Hkv]``: ``amax[h] / fp8_max``, ``amax[h]`` the largest finite
    magnitude of KV head h over the whole array (unused cache slots included); a head
    whose scale would be 0 or below float32's smallest normal (all zeros) gets 1.
    ``cache_fp8``: the values quantized with it as ``update_kv_cache`` does (nearest even,
    saturating: +-inf becomes +-amax; NaN stays NaN). Pass ``scale`` as ``k_scale`` (or
    ``v_scale``) to ``attention``, ``attention_with_kvcache`` and ``update_kv_cache``.

  Error model: a finite value ``x`` of head h comes back as ``x' = cache_fp8 * scale``
  with ``|x' - x| <= 2^-(M+1) |x|`` (``M`` mantissa bits: 6.25% for e4m3fn, 12.5% for
  e5m2) down to the smallest normal FP8 value times the scale (``amax / 28672`` for
  e4m3fn, ``amax / 939524096`` for e5m2), and below it ``|x' - x|`` at most half the
  subnormal step times the scale (``amax / 458752`` for e4m3fn, ``amax / 7516192768``
  for e5m2), up to float32 rounding. The largest value maps to the largest FP8 value, so
  nothing saturates but infinities. Pure JAX: runs on any device.
  """
  cache = _float_input("cache", cache, 2, "[..., Hkv, D]")
  dtype = _validation.fp8_dtype("dtype", dtype)
  x = cache.astype(jnp.float32)
  others = tuple(a for a in range(x.ndim) if a != x.ndim - 2)
  scale = _amax_scale(jnp.max(_finite_magnitudes(x), axis=others, initial=0.0), dtype)
  return reference.quantize_fp8(x, scale, dtype), scale


def quantize_fp8(
  x: ArrayLike,
  *,
  num_kv_heads: int | None = None,
  cu_seqlens: ArrayLike | None = None,
  dtype: DTypeLike = jnp.float8_e4m3fn,
) -> tuple[jax.Array, jax.Array]:
  """Quantizes attention inputs to FP8 with one scale per sequence and KV head:
  ``(x_fp8, scale)``.

  Args:
    x: float32, bfloat16 or float16 queries, keys or values: dense ``[B, S, H, D]``, or
      packed ``[T, H, D]`` with ``cu_seqlens`` ``[B + 1]`` (``attention``'s layouts).
    num_kv_heads: Hkv, which divides H; default H. For queries pass the keys' head count:
      the ``H / Hkv`` query heads of a KV head (``h // (H / Hkv)``) share its scale, as the
      kernel folds one ``q_scale`` per KV head into the scores.
    cu_seqlens: packed ``x`` only: the sequences' prefix sums; rows outside every sequence
      are quantized with scale 1 (they are never read).
    dtype: ``float8_e4m3fn`` (default) or ``float8_e5m2``.

  Returns:
    ``scale`` float32 ``[B, Hkv]``: ``amax / fp8_max`` with ``amax`` the largest finite
    magnitude over sequence b's positions, the heads of KV head h and D (1 where that is 0
    or below float32's smallest normal, e.g. an empty sequence). ``x_fp8``: x's shape,
    quantized with it as ``quantize_kv`` does (nearest even, saturating: +-inf becomes
    +-amax; NaN stays NaN), with ``quantize_kv``'s error model. Pass ``scale`` as
    ``q_scale`` (``k_scale``, ``v_scale``) to ``attention``.
  """
  x = _float_input("x", x, 3, "dense [B, S, H, D] or packed [T, H, D] with cu_seqlens")
  dtype = _validation.fp8_dtype("dtype", dtype)
  heads, d = x.shape[-2], x.shape[-1]
  if num_kv_heads is None:
    num_kv_heads = heads
  num_kv_heads = _validation.static_int("num_kv_heads", num_kv_heads, 1)
  if heads % num_kv_heads:
    raise ValueError(f"num_kv_heads: expected a divisor of x's {heads} heads, got {num_kv_heads}")
  if cu_seqlens is None:
    _validation.rank("x", x, (4,), "dense [B, S, H, D]; packed [T, H, D] needs cu_seqlens")
    # [B, S, Hkv, group * D]: the slices of one scale are axes 1 and 3.
    grouped = x.astype(jnp.float32).reshape(x.shape[:2] + (num_kv_heads, -1))
    scale = _amax_scale(jnp.max(_finite_magnitudes(grouped), axis=(1, 3), initial=0.0), dtype)
    row_scale = scale[:, None]
  else:
    _validation.rank("x", x, (3,), "packed [T, H, D] with cu_seqlens; dense x is rank 4")
    cu_seqlens = _validation.int32_vector("cu_seqlens", cu_seqlens, None, "[B + 1] prefix sums")
    batch = cu_seqlens.shape[0] - 1
    grouped = x.astype(jnp.float32).reshape(x.shape[0], num_kv_heads, -1)
    # Rows outside every sequence form an extra segment (dropped) and get scale 1; an empty
    # sequence's amax is -inf (scale 1).
    seg, _, _ = reference._segments(cu_seqlens, x.shape[0])
    row_amax = jnp.max(_finite_magnitudes(grouped), axis=2)
    amax = jax.ops.segment_max(row_amax, jnp.where(seg >= 0, seg, batch), batch + 1)[:batch]
    scale = _amax_scale(amax, dtype)
    row_scale = reference._row_scales(scale, seg)
  x_fp8 = reference.quantize_fp8(grouped, row_scale, dtype)
  return x_fp8.reshape(x.shape[:-2] + (heads, d)), scale
