"""KV-cache append and the one-call append-then-attend used for decoding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_fmha import _checks, _primitives, reference
from jax_fmha.attention import BACKENDS, attention


def update_kv_cache(k_cache, v_cache, k_new, v_new, block_table, cache_seqlens,
                    cu_seqlens_new=None, *, backend: str = "auto"):
  """Writes new tokens into a paged or contiguous KV cache; returns ``(k_cache, v_cache)``.

  Args:
    k_cache, v_cache: pages ``[num_pages, page_size, Hkv, D]`` (with ``block_table``) or a
      contiguous cache ``[B, S_max, Hkv, D]`` (``block_table=None``).
    k_new, v_new: the new tokens, dense ``[B, S_new, Hkv, D]`` or packed ``[T_new, Hkv, D]``
      with ``cu_seqlens_new`` int32 ``[B + 1]``; the caches' dtype.
    block_table: int32 ``[B, pages_per_seq]`` or None.
    cache_seqlens: int32 ``[B]``: tokens already in each sequence's cache. New token ``t``
      of sequence ``b`` goes to position ``cache_seqlens[b] + t``.
    cu_seqlens_new: prefix sums of the packed new tokens, or None (dense).
    backend: ``"auto"`` (kernel) or ``"reference"`` (pure JAX scatter, same semantics).

  The cache results alias the cache operands: under ``jax.jit(..., donate_argnums=...)``
  with the caches donated, the update happens in place, with no copy of the cache.
  Writes past a sequence's capacity (``S_max``, or ``pages_per_seq * page_size``), onto a
  page id outside ``[0, num_pages)``, or with a negative ``cache_seqlens[b]`` are dropped.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
  k_cache, v_cache, k_new, v_new = (_checks.array(n, x) for n, x in (
      ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)))
  for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new),
                  ("v_new", v_new)):
    _checks.float_dtype(name, x)
  _checks.same_dtype(("k_cache", "v_cache", "k_new", "v_new"), k_cache, v_cache, k_new, v_new)
  _checks.rank("k_cache", k_cache, (4,), "pages [num_pages, page_size, Hkv, D] or a "
               "contiguous cache [B, S_max, Hkv, D]")
  if v_cache.shape != k_cache.shape:
    raise ValueError(f"v_cache: expected k_cache's shape {tuple(k_cache.shape)}, got "
                     f"{tuple(v_cache.shape)}")
  if v_new.shape != k_new.shape:
    raise ValueError(f"v_new: expected k_new's shape {tuple(k_new.shape)}, got "
                     f"{tuple(v_new.shape)}")
  if cu_seqlens_new is not None:
    _checks.rank("k_new", k_new, (3,), "packed [T_new, Hkv, D] with cu_seqlens_new")
    cu_seqlens_new = _checks.int32_vector("cu_seqlens_new", cu_seqlens_new, None,
                                          "[B + 1] prefix sums")
    batch = cu_seqlens_new.shape[0] - 1
  else:
    _checks.rank("k_new", k_new, (4,), "dense [B, S_new, Hkv, D]; packed new tokens need "
                 "cu_seqlens_new")
    batch = k_new.shape[0]
  if k_new.shape[-2:] != k_cache.shape[-2:]:
    raise ValueError(f"k_new: heads and head_dim {tuple(k_new.shape[-2:])} differ from the "
                     f"cache's {tuple(k_cache.shape[-2:])}")
  cache_seqlens = _checks.int32_vector("cache_seqlens", cache_seqlens, batch,
                                       "[B] tokens already cached per sequence")
  if block_table is not None:
    block_table = _checks.block_table(block_table, batch)
    kv_layout = _primitives.KV_PAGED
  else:
    if k_cache.shape[0] != batch:
      raise ValueError(f"k_cache: contiguous cache batch {k_cache.shape[0]} differs from "
                       f"the new tokens' batch {batch}")
    kv_layout = _primitives.KV_CACHE
  if backend == "reference":
    return reference.update_kv_cache(k_cache, v_cache, k_new, v_new, block_table,
                                     cache_seqlens, cu_seqlens_new)
  empty = _primitives.empty_i32
  k_cache, v_cache = _primitives.update_kv_cache_p.bind(
      k_cache, v_cache, k_new, v_new,
      empty(0, 0) if block_table is None else block_table, cache_seqlens,
      empty() if cu_seqlens_new is None else cu_seqlens_new, kv_layout=np.int32(kv_layout))
  return k_cache, v_cache


def attention_with_kvcache(q, k_cache, v_cache, k_new=None, v_new=None, *, cache_seqlens,
                           block_table=None, cu_seqlens_q=None, max_seqlen_q=None,
                           causal: bool = False, scale=None, window=(-1, -1),
                           softcap: float = 0.0, num_splits=None, return_lse: bool = False,
                           backend: str = "auto"):
  """Appends ``k_new``/``v_new`` to the cache, then attends over cache plus new tokens.

  ``q`` is dense ``[B, Sq, Hq, D]`` or packed ``[Tq, Hq, D]`` with ``cu_seqlens_q``; the new
  tokens have q's layout (the same ``cu_seqlens_q`` when packed) and are the last tokens of
  each sequence, so a causal mask lets new query ``i`` see the cache and new tokens up to
  its own position. ``cache_seqlens [B]`` counts the tokens cached before this call.
  Without ``k_new``/``v_new`` this is attention over the cache alone.

  Returns ``(out, k_cache, v_cache)`` (``(out, lse, k_cache, v_cache)`` with
  ``return_lse``). Donate the caches under ``jax.jit`` for an in-place update.
  """
  if (k_new is None) != (v_new is None):
    raise ValueError("k_new and v_new: give both or neither")
  cache_seqlens = _checks.int32_vector(
      "cache_seqlens", cache_seqlens, None, "[B] tokens already cached per sequence")
  seq_lens = cache_seqlens
  if k_new is not None:
    k_cache, v_cache = update_kv_cache(k_cache, v_cache, k_new, v_new, block_table,
                                       cache_seqlens, cu_seqlens_new=cu_seqlens_q,
                                       backend=backend)
    new_lens = (jnp.diff(cu_seqlens_q) if cu_seqlens_q is not None
                else jnp.full(cache_seqlens.shape, jnp.shape(k_new)[1], jnp.int32))
    seq_lens = cache_seqlens + new_lens
  result = attention(q, k_cache, v_cache, causal=causal, scale=scale, window=window,
                     softcap=softcap, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
                     block_table=block_table, seq_lens=seq_lens, num_splits=num_splits,
                     return_lse=return_lse, backend=backend)
  if return_lse:
    return result[0], result[1], k_cache, v_cache
  return result, k_cache, v_cache
