"""KV-cache append (``update_kv_cache``, with its primitive) and the one-call
append-then-attend used for decoding (``attention_with_kvcache``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jax_fmha import _validation, reference
from jax_fmha._partitioning import SplitRule, fp8_scale_axes
from jax_fmha._primitives import define_ffi_primitive, empty_f32, empty_i32, map_over_batch
from jax_fmha._validation import Backend
from jax_fmha.attention import attention


def update_kv_cache(
  k_cache: ArrayLike,
  v_cache: ArrayLike,
  k_new: ArrayLike,
  v_new: ArrayLike,
  block_table: ArrayLike | None,
  cache_seqlens: ArrayLike,
  cu_seqlens_new: ArrayLike | None = None,
  *,
  k_scale: ArrayLike | None = None,
  v_scale: ArrayLike | None = None,
  backend: Backend = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Writes new tokens into a paged or contiguous KV cache; returns ``(k_cache, v_cache)``.

  Args:
    k_cache, v_cache: pages ``[num_pages, page_size, Hkv, D]`` (with ``block_table``) or a
      contiguous cache ``[B, S_max, Hkv, D]`` (``block_table=None``).
    k_new, v_new: the new tokens, dense ``[B, S_new, Hkv, D]`` or packed ``[T_new, Hkv, D]``
      with ``cu_seqlens_new`` ``[B + 1]``; the caches' dtype (float32, bfloat16 or
      float16, on every backend), or any of those for FP8 caches.
    block_table: ``[B, pages_per_seq]`` or None.
    cache_seqlens: ``[B]``: tokens already in each sequence's cache. New token ``t``
      of sequence ``b`` goes to position ``cache_seqlens[b] + t``.
    cu_seqlens_new: prefix sums of the packed new tokens, or None (dense).
    k_scale, v_scale: FP8 caches only (a ValueError otherwise): the scales the new tokens
      are quantized with, a Python float, or a float32 scalar, ``[Hkv]`` or ``[B, Hkv]``
      (per sequence: sequence b's tokens of KV head h use ``scale[b, h]``) array; default
      1.0. The cache's dequantization scales: pass the same ones to ``attention``.
    backend: ``"auto"`` (kernel) or ``"reference"`` (pure JAX scatter, same semantics).

  FP8 caches (``float8_e4m3fn``, ``float8_e5m2``) store each new value as
  ``value / scale[b, kv_head]`` (computed as ``value * (1 / scale)`` in float32) rounded to
  the nearest FP8 value, ties to even. Magnitudes past the largest finite FP8 value (448
  for e4m3fn, 57344 for e5m2), infinities included, saturate to it with their sign; NaN
  stays NaN. The CPU and CUDA kernels store the same bytes.

  Index arrays (``block_table``, ``cache_seqlens``, ``cu_seqlens_new``) may be Python
  lists, NumPy or jax arrays of any integer dtype; they are converted to int32 at trace
  time, so values must fit int32 (larger ones are the caller's error). Float or bool
  index arrays raise a TypeError.

  The cache results alias the cache operands: under ``jax.jit(..., donate_argnums=...)``
  with the caches donated, the update happens in place, with no copy of the cache.
  Writes past a sequence's capacity (``S_max``, or ``pages_per_seq * page_size``), onto a
  page id outside ``[0, num_pages)``, or with a negative ``cache_seqlens[b]`` are dropped.
  """
  update = _validation.update_kv_cache(
    k_cache,
    v_cache,
    k_new,
    v_new,
    block_table,
    cache_seqlens,
    cu_seqlens_new,
    k_scale,
    v_scale,
    backend,
  )
  if backend == "reference":
    return reference.update_kv_cache(
      update.k_cache,
      update.v_cache,
      update.k_new,
      update.v_new,
      update.block_table,
      update.cache_seqlens,
      update.cu_seqlens_new,
      k_scale=update.k_scale,
      v_scale=update.v_scale,
    )
  k_cache, v_cache = update_kv_cache_p.bind(
    update.k_cache,
    update.v_cache,
    update.k_new,
    update.v_new,
    empty_i32(0, 0) if update.block_table is None else update.block_table,
    update.cache_seqlens,
    empty_i32() if update.cu_seqlens_new is None else update.cu_seqlens_new,
    empty_f32() if update.k_scale is None else update.k_scale,
    empty_f32() if update.v_scale is None else update.v_scale,
    kv_layout=update.kv_layout,
  )
  return k_cache, v_cache


def attention_with_kvcache(
  q: ArrayLike,
  k_cache: ArrayLike,
  v_cache: ArrayLike,
  k_new: ArrayLike | None = None,
  v_new: ArrayLike | None = None,
  *,
  cache_seqlens: ArrayLike,
  block_table: ArrayLike | None = None,
  cu_seqlens_q: ArrayLike | None = None,
  max_seqlen_q: int | None = None,
  causal: bool = False,
  scale: float | None = None,
  window: tuple[int, int] = (-1, -1),
  softcap: float = 0.0,
  num_splits: int | None = None,
  q_scale: ArrayLike | None = None,
  k_scale: ArrayLike | None = None,
  v_scale: ArrayLike | None = None,
  out_dtype: DTypeLike | None = None,
  return_lse: bool = False,
  backend: Backend = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Appends ``k_new``/``v_new`` to the cache, then attends over cache plus new tokens.

  ``q`` is dense ``[B, Sq, Hq, D]`` or packed ``[Tq, Hq, D]`` with ``cu_seqlens_q``; the new
  tokens have q's layout (the same ``cu_seqlens_q`` when packed) and are the last tokens of
  each sequence, so a causal mask lets new query ``i`` see the cache and new tokens up to
  its own position. ``cache_seqlens [B]`` counts the tokens cached before this call.
  Without ``k_new``/``v_new`` this is attention over the cache alone.

  Layouts, dtypes and arguments are those of ``attention`` and ``update_kv_cache``: index
  arrays (``cache_seqlens``, ``block_table``, ``cu_seqlens_q``) of any integer dtype are
  converted to int32 at trace time (values must fit int32). float32 runs on the CPU
  backend and the reference; on the GPU the kernel takes bfloat16/float16: cast q, the
  caches and the new tokens (``.astype(jnp.bfloat16)``); float32 there raises a TypeError
  at trace time. FP8 caches (with ``k_scale``, ``v_scale``) quantize the new tokens as
  ``update_kv_cache`` does and dequantize in the attention as ``attention`` does. FP8 q
  (with ``q_scale``, and ``out_dtype``) takes an FP8 cache of its format, as ``attention``
  does; the new tokens are 16-bit or float32 and quantized into the cache. B in the scales'
  ``[B, Hkv]`` shape is ``cache_seqlens``' length.

  Returns ``(out, k_cache, v_cache)`` (``(out, lse, k_cache, v_cache)`` with
  ``return_lse``). Donate the caches under ``jax.jit`` for an in-place update.
  """
  cache_seqlens, cu_seqlens_q, block_table = _validation.attention_with_kvcache(
    k_new, v_new, cache_seqlens, cu_seqlens_q, block_table
  )
  seq_lens = cache_seqlens
  if k_new is not None:
    k_cache, v_cache = update_kv_cache(
      k_cache,
      v_cache,
      k_new,
      v_new,
      block_table,
      cache_seqlens,
      cu_seqlens_new=cu_seqlens_q,
      k_scale=k_scale,
      v_scale=v_scale,
      backend=backend,
    )
    new_lens = (
      jnp.diff(cu_seqlens_q)
      if cu_seqlens_q is not None
      else jnp.full(cache_seqlens.shape, jnp.shape(k_new)[1], jnp.int32)
    )
    seq_lens = cache_seqlens + new_lens
  result = attention(
    q,
    k_cache,
    v_cache,
    causal=causal,
    scale=scale,
    window=window,
    softcap=softcap,
    cu_seqlens_q=cu_seqlens_q,
    max_seqlen_q=max_seqlen_q,
    block_table=block_table,
    seq_lens=seq_lens,
    num_splits=num_splits,
    q_scale=q_scale,
    k_scale=k_scale,
    v_scale=v_scale,
    out_dtype=out_dtype,
    return_lse=return_lse,
    backend=backend,
  )
  if return_lse:
    return result[0], result[1], k_cache, v_cache
  return result, k_cache, v_cache


# ---------------------------------------------------------------------------------------
# The cache-append primitive (in place: the cache results alias the cache operands)
# ---------------------------------------------------------------------------------------


def _update_abstract_eval(k_cache, v_cache, *avals, kv_layout):
  return (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),) * 2


def _update_split_rule(k_cache, v_cache, k_new, v_new, *avals, kv_layout) -> SplitRule:
  """KV heads split; so does the batch of a contiguous cache with dense new tokens. A paged
  update never splits the batch: page ids are global, so every copy of the pool must take
  every sequence's writes, or the copies would diverge. FP8 caches' scales ``[B, Hkv]``
  split with the batch and the heads."""
  cache = "pages page_size" if kv_layout == "paged" else "batch seq"
  new = "batch seq_new" if k_new.ndim == 4 else "tokens_new"
  block_table = "batch table_pages" if kv_layout == "paged" else "_ _"
  cu_seqlens_new = "offsets_new" if k_new.ndim == 3 else "_"
  scales = ", ".join(fp8_scale_axes(scale) for scale in avals[-2:])
  caches = f"{cache} kv_heads head_dim"
  news = f"{new} kv_heads head_dim"
  return SplitRule(
    f"{caches}, {caches}, {news}, {news}, {block_table}, batch, {cu_seqlens_new}, {scales} "
    f"-> {caches}, {caches}",
    shardable={"kv_heads", "batch"} if kv_layout == "cache" and k_new.ndim == 4 else {"kv_heads"},
  )


def _update_batching(args, dims, **params):
  return map_over_batch(update_kv_cache_p, args, dims, params)


update_kv_cache_p = define_ffi_primitive(
  "jax_fmha_update_kv_cache",
  "jax_fmha_update_kv_cache",
  _update_abstract_eval,
  _update_batching,
  api_name="update_kv_cache",
  split_rule=_update_split_rule,
  operand_names=(
    "k_cache",
    "v_cache",
    "k_new",
    "v_new",
    "block_table",
    "cache_seqlens",
    "cu_seqlens_new",
    "k_scale",
    "v_scale",
  ),
  named_params={"kv_layout": "kv_layouts"},
  operand_output_aliases={0: 0, 1: 1},
)
