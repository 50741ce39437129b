"""JAX primitives behind the public API: abstract evaluation, lowering, batching.

Each primitive lowers to one XLA FFI custom call whose target name is the same on every
platform (``_ffi`` registers the CPU and CUDA handlers under it). Operands are passed
exactly as the handlers decode them (``ffi/common/*_ffi.h``); absent optional operands are
empty int32 arrays. Parameters are numpy scalars so that the FFI attributes are typed
exactly. The primitives are forward-only: differentiating through them raises.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_fmha import _ffi

# Key/value layouts, as ffi/common/attention_problem.h numbers them.
KV_UNIFORM, KV_PACKED, KV_CACHE, KV_PAGED = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------


def derived_aval(aval, shape, dtype, axes):
  """An aval of `shape`/`dtype` whose axis i is sharded like `aval`'s axis axes[i].

  ``axes[i] = None`` leaves the new axis unsharded. Keeps everything else about `aval`
  (mesh, memory space) so outputs inherit the inputs' sharding information.
  """
  spec = tuple(aval.sharding.spec)
  new_spec = jax.sharding.PartitionSpec(
      *(spec[a] if a is not None and a < len(spec) else None for a in axes))
  return aval.update(shape=tuple(shape), dtype=dtype,
                     sharding=aval.sharding.update(spec=new_spec))


@functools.cache
def _jitted_bind(primitive: Primitive, params: tuple):
  return jax.jit(lambda *args: primitive.bind(*args, **dict(params)))


def _forward_only_jvp(name: str):
  def jvp(primals, tangents, **params):
    raise NotImplementedError(
        f"jax_fmha.{name} is forward-only (inference kernels): it has no gradient. "
        f"Differentiate through backend='reference' (pure JAX) instead, or, if no gradient "
        f"should flow through this call, apply jax.lax.stop_gradient to its inputs.")
  return jvp


def define_ffi_primitive(name: str, target: str, abstract_eval: Callable,
                         batching_rule: Callable, api_name: str,
                         static_params: tuple[str, ...] = (),
                         platform_check: Callable | None = None, **lowering_args) -> Primitive:
  """A multiple-results primitive lowered to the FFI target `target` on any platform
  for which a handler was built, raising a clear error on the others.

  Every parameter becomes an FFI attribute except those named in `static_params` (used by
  abstract evaluation only). `lowering_args` go to the custom call (for example
  ``operand_output_aliases``). `platform_check(platform, avals_in)` may raise for inputs
  a platform's kernel does not take (at trace time, instead of a runtime error).
  """
  primitive = Primitive(name)
  primitive.multiple_results = True
  primitive.def_impl(
      lambda *args, **params: _jitted_bind(primitive, tuple(params.items()))(*args))
  primitive.def_abstract_eval(abstract_eval)
  ffi_rule = jax.ffi.ffi_lowering(target, **lowering_args)

  def lowering(ctx, *args, **params):
    for platform in ctx.module_context.platforms:
      if not _ffi.has_target(target, platform):
        raise _ffi.missing_kernel_error(target, platform)
      if platform_check is not None:
        platform_check(platform, ctx.avals_in)
    attributes = {k: v for k, v in params.items() if k not in static_params}
    return ffi_rule(ctx, *args, **attributes)

  mlir.register_lowering(primitive, lowering)
  batching.primitive_batchers[primitive] = batching_rule
  ad.primitive_jvps[primitive] = _forward_only_jvp(api_name)
  return primitive


def map_over_batch(primitive: Primitive, args, dims, params):
  """Batching fallback: one primitive call per batch element (lax.map)."""
  mapped = [i for i, d in enumerate(dims) if d is not None]
  moved = [jnp.moveaxis(args[i], dims[i], 0) for i in mapped]

  def one(xs):
    full = list(args)
    for i, x in zip(mapped, xs):
      full[i] = x
    return tuple(primitive.bind(*full, **params))

  outs = jax.lax.map(one, moved)
  return list(outs), [0] * len(outs)


def broadcast_batched(args: Sequence, dims: Sequence, size: int):
  """Moves each batch axis to the front; broadcasts the unbatched args to `size`."""
  return [jnp.moveaxis(a, d, 0) if d is not None
          else jnp.broadcast_to(a, (size,) + a.shape) for a, d in zip(args, dims)]


# ---------------------------------------------------------------------------------------
# Attention forward
# ---------------------------------------------------------------------------------------


def _attention_abstract_eval(q, k, v, cu_seqlens_q, cu_seqlens_k, seq_lens, block_table, *,
                             scale, softcap, window_left, window_right, kv_layout, num_splits,
                             max_seqlen_q):
  if q.ndim == 4:  # dense [B, Sq, Hq, D] -> lse [B, Hq, Sq]
    lse_shape, lse_axes = (q.shape[0], q.shape[2], q.shape[1]), (0, 2, 1)
  else:  # packed [Tq, Hq, D] -> lse [Hq, Tq]
    lse_shape, lse_axes = (q.shape[1], q.shape[0]), (1, 0)
  if num_splits == 1:
    return (q.update(), derived_aval(q, lse_shape, jnp.float32, lse_axes))
  # Split-KV: float32 partial outputs and LSEs, one per split, on a new leading axis.
  out = derived_aval(q, (num_splits,) + q.shape, jnp.float32, (None,) + tuple(range(q.ndim)))
  lse = derived_aval(q, (num_splits,) + lse_shape, jnp.float32, (None,) + lse_axes)
  return (out, lse)


def _attention_batching(args, dims, **params):
  q = args[0]
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  dense_q = q.ndim - (dims[0] is not None) == 4
  # Dense queries with dense / cached / paged keys: the vmapped axis folds into the batch.
  # Packed (variable-length) forms run once per batch element.
  if dense_q and int(params["kv_layout"]) != KV_PACKED:
    layout = int(params["kv_layout"])
    q, k, v, seq_lens, table = _fold_dense(args, dims, size, layout)
    out, lse = attention_fwd_p.bind(q, k, v, args[3], args[4], seq_lens, table, **params)
    lead = 0 if params["num_splits"] == 1 else 1
    out = out.reshape(out.shape[:lead] + (size, -1) + out.shape[lead + 1:])
    lse = lse.reshape(lse.shape[:lead] + (size, -1) + lse.shape[lead + 1:])
    return [out, lse], [lead, lead]
  return map_over_batch(attention_fwd_p, args, dims, params)


def _fold_dense(args, dims, size, layout):
  q, k, v, _, _, seq_lens, table = args
  merge = lambda x: x.reshape((-1,) + x.shape[2:])
  q = merge(broadcast_batched([q], dims[:1], size)[0])
  if layout in (KV_UNIFORM, KV_CACHE):
    k, v = (merge(x) for x in broadcast_batched([k, v], dims[1:3], size))
    if layout == KV_CACHE:
      seq_lens = merge(broadcast_batched([seq_lens], dims[5:6], size)[0])
    return q, k, v, seq_lens, table
  # Paged: pages may be shared (unbatched) or per batch element (stacked, ids offset).
  seq_lens, table = (merge(x) for x in broadcast_batched([seq_lens, table], dims[5:7], size))
  if dims[1] is not None or dims[2] is not None:
    k, v = broadcast_batched([k, v], dims[1:3], size)
    num_pages = k.shape[1]
    offsets = jnp.repeat(jnp.arange(size, dtype=jnp.int32) * num_pages,
                         table.shape[0] // size)
    table = table + offsets[:, None]
    k, v = merge(k), merge(v)
  return q, k, v, seq_lens, table


def _attention_platform_check(platform, avals_in):
  # The CUDA kernel runs on tensor cores: bfloat16 and float16 only.
  if platform == "cuda" and avals_in[0].dtype == jnp.float32:
    raise TypeError(
        "jax_fmha.attention on the GPU takes bfloat16 or float16 q, k, v, got float32: cast "
        "them (e.g. q.astype(jnp.bfloat16)), or use backend='reference' for float32")


attention_fwd_p = define_ffi_primitive(
    "jax_fmha_attention_fwd", "jax_fmha_attention_fwd", _attention_abstract_eval,
    _attention_batching, api_name="attention", platform_check=_attention_platform_check)


def empty_i32(*shape):
  return jnp.zeros(shape or (0,), jnp.int32)


def attention_fwd(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, seq_lens=None,
                  block_table=None, scale: float, softcap: float, window: tuple[int, int],
                  kv_layout: int, num_splits: int, max_seqlen_q: int):
  """Binds the attention forward primitive; arguments are already validated."""
  return attention_fwd_p.bind(
      q, k, v,
      empty_i32() if cu_seqlens_q is None else cu_seqlens_q,
      empty_i32() if cu_seqlens_k is None else cu_seqlens_k,
      empty_i32() if seq_lens is None else seq_lens,
      empty_i32(0, 0) if block_table is None else block_table,
      scale=np.float32(scale), softcap=np.float32(softcap),
      window_left=np.int32(window[0]), window_right=np.int32(window[1]),
      kv_layout=np.int32(kv_layout), num_splits=np.int32(num_splits),
      max_seqlen_q=np.int32(max_seqlen_q))


# ---------------------------------------------------------------------------------------
# Split-KV merge
# ---------------------------------------------------------------------------------------


def _merge_abstract_eval(partial_out, partial_lse, *, out_dtype):
  rest = tuple(range(1, partial_out.ndim))
  return (derived_aval(partial_out, partial_out.shape[1:], out_dtype, rest),
          derived_aval(partial_lse, partial_lse.shape[1:], jnp.float32, rest[:-1]))


def _merge_batching(args, dims, *, out_dtype):
  # Row-wise over every axis but the leading split axis: the vmapped axis becomes axis 1.
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  partial_out, partial_lse = (jnp.moveaxis(x, 0, 1) for x in broadcast_batched(args, dims, size))
  outs = merge_states_p.bind(partial_out, partial_lse, out_dtype=out_dtype)
  return list(outs), [0, 0]


merge_states_p = define_ffi_primitive(
    "jax_fmha_merge_states", "jax_fmha_merge_states", _merge_abstract_eval, _merge_batching,
    api_name="merge_attention_states", static_params=("out_dtype",))


# ---------------------------------------------------------------------------------------
# KV-cache append (in place: the cache results alias the cache operands)
# ---------------------------------------------------------------------------------------


def _update_abstract_eval(k_cache, v_cache, k_new, v_new, block_table, cache_seqlens,
                          cu_seqlens_new, *, kv_layout):
  return (k_cache.update(), v_cache.update())


def _update_batching(args, dims, **params):
  return map_over_batch(update_kv_cache_p, args, dims, params)


update_kv_cache_p = define_ffi_primitive(
    "jax_fmha_update_kv_cache", "jax_fmha_update_kv_cache", _update_abstract_eval,
    _update_batching, api_name="update_kv_cache", operand_output_aliases={0: 0, 1: 1})
