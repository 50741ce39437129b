"""What every jax_fmha primitive shares: definition, lowering, batching helpers.

Each primitive (defined next to its public function: ``attention``, ``kv_cache``,
``merge``, ``mlp``) lowers to one XLA FFI custom call whose target name is the same on
every platform (``_ffi`` registers the CPU and CUDA handlers under it). Operands are passed
exactly as the handlers decode them (``ffi/common/*_ffi.h``); absent optional operands are
empty arrays (int32 indices, float32 scales). Numeric parameters are numpy scalars so that
the FFI attributes are typed exactly; enumerations (layouts, activations) are names in
Python, converted to the extension's numbers in the lowering. The primitives are
forward-only: differentiating through them raises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_fmha import _ffi


def derived_aval(aval, shape, dtype, axes):
  """An aval of `shape`/`dtype` whose axis i is sharded like `aval`'s axis axes[i].

  ``axes[i] = None`` leaves the new axis unsharded. Keeps everything else about `aval`
  (mesh, memory space) so outputs inherit the inputs' sharding information.
  """
  spec = tuple(aval.sharding.spec)
  new_spec = jax.sharding.PartitionSpec(
    *(spec[a] if a is not None and a < len(spec) else None for a in axes)
  )
  return aval.update(shape=tuple(shape), dtype=dtype, sharding=aval.sharding.update(spec=new_spec))


@functools.cache
def _jitted_bind(primitive: Primitive, params: tuple):
  return jax.jit(lambda *args: primitive.bind(*args, **dict(params)))


def _forward_only_jvp(name: str):
  def jvp(primals, tangents, **params):
    raise NotImplementedError(
      f"jax_fmha.{name} is forward-only (inference kernels): it has no gradient. "
      f"Differentiate through backend='reference' (pure JAX) instead, or, if no gradient "
      f"should flow through this call, apply jax.lax.stop_gradient to its inputs."
    )

  return jvp


def define_ffi_primitive(
  name: str,
  target: str,
  abstract_eval: Callable,
  batching_rule: Callable,
  api_name: str,
  static_params: tuple[str, ...] = (),
  named_params: Mapping[str, str] | None = None,
  platform_check: Callable | None = None,
  **lowering_args,
) -> Primitive:
  """A multiple-results primitive lowered to the FFI target `target` on any platform
  for which a handler was built, raising a clear error on the others.

  Every parameter becomes an FFI attribute except those named in `static_params` (used by
  abstract evaluation only). A parameter in `named_params` holds a name (e.g. ``"paged"``)
  that the lowering converts to an int32 through the table ``_ffi.constants()[table]``
  (``named_params = {param: table}``). `lowering_args` go to the custom call (for example
  ``operand_output_aliases``). `platform_check(platform, avals_in)` may raise for inputs
  a platform's kernel does not take (at trace time, instead of a runtime error).
  """
  primitive = Primitive(name)
  primitive.multiple_results = True
  primitive.def_impl(lambda *args, **params: _jitted_bind(primitive, tuple(params.items()))(*args))
  primitive.def_abstract_eval(abstract_eval)
  ffi_rule = jax.ffi.ffi_lowering(target, **lowering_args)

  def lowering(ctx, *args, **params):
    for platform in ctx.module_context.platforms:
      if not _ffi.has_target(target, platform):
        raise _ffi.missing_kernel_error(target, platform)
      if platform_check is not None:
        platform_check(platform, ctx.avals_in)
    attributes = {k: v for k, v in params.items() if k not in static_params}
    for param, table in (named_params or {}).items():
      attributes[param] = np.int32(_ffi.constants()[table][attributes[param]])
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
  return [
    jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size,) + a.shape)
    for a, d in zip(args, dims)
  ]


def empty_i32(*shape):
  """The placeholder of an absent optional int32 operand (shape (0,) by default)."""
  return jnp.zeros(shape or (0,), jnp.int32)


def empty_f32():
  """The placeholder of an absent optional float32 operand (FP8 scales): shape (0,)."""
  return jnp.zeros((0,), jnp.float32)
