"""What every jax_fmha primitive shares: definition, lowering, batching helpers.

Each primitive (defined next to its public function: ``attention``, ``kv_cache``,
``merge``, ``mlp``) lowers to one XLA FFI custom call whose target name is the same on
every platform (``_ffi`` registers the CPU and CUDA handlers under it). Operands are passed
exactly as the handlers decode them (``ffi/common/*_ffi.h``); absent optional operands are
empty arrays (int32 indices, float32 scales). Numeric parameters are numpy scalars so that
the FFI attributes are typed exactly; enumerations (layouts, activations) are names in
Python, converted to the extension's numbers in the lowering. The primitives are
forward-only: differentiating through them raises.

Each primitive's lowering goes through ``jax.experimental.custom_partitioning``: in a
program split over a device mesh, JAX's partitioner (Shardy, or GSPMD) splits the call as
the primitive's ``SplitRule`` says (``_partitioning``), and every device runs the kernel on
its shard. The primitive keeps its own abstract evaluation and batching rule
(custom_partitioning has none). docs/design/sharding.md describes each rule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import Mesh, NamedSharding

from jax_fmha import _ffi
from jax_fmha._partitioning import Factors, SplitRule, padded_spec


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
  split_rule: Callable[..., SplitRule],
  operand_names: Sequence[str],
  static_params: tuple[str, ...] = (),
  named_params: Mapping[str, str] | None = None,
  platform_check: Callable | None = None,
  **lowering_args,
) -> Primitive:
  """A multiple-results primitive lowered to the FFI target `target` on any platform
  for which a handler was built, raising a clear error on the others.

  `abstract_eval(*avals, **params)` returns the results' shapes and dtypes
  (``jax.ShapeDtypeStruct``s); their shardings come from `split_rule(*avals, **params)`,
  the primitive's ``SplitRule``, which also tells JAX's partitioners how the call splits
  over a mesh: each shard runs the kernel on its local shapes. `operand_names` name the
  operands in errors. Under ``shard_map`` each result varies over every manual axis some
  operand varies over.

  Every parameter becomes an FFI attribute except those named in `static_params` (used by
  abstract evaluation only). A parameter in `named_params` holds a name (e.g. ``"paged"``)
  that the lowering converts to an int32 through the table ``_ffi.constants()[table]``
  (``named_params = {param: table}``). `lowering_args` go to the custom call (for example
  ``operand_output_aliases``). `platform_check(platform, avals_in, params)` may raise for inputs
  a platform's kernel does not take (at trace time, instead of a runtime error).
  """

  def typed_abstract_eval(*avals, **params):
    factors = Factors(split_rule(*avals, **params), [a.shape for a in avals])
    # Operands share one mesh, or have none (constants, index arrays made in the program).
    typed = next((a for a in avals if not a.sharding.mesh.empty), avals[0])
    specs = [padded_spec(a.sharding, a.ndim) for a in avals]
    assignment = factors.check_explicit(specs, typed.sharding.mesh.shape, api_name, operand_names)
    varying = frozenset().union(*(a.mat.varying for a in avals))
    return [
      typed.update(
        shape=result.shape,
        dtype=result.dtype,
        weak_type=False,
        sharding=typed.sharding.update(spec=spec),
        manual_axis_type=typed.mat.update(varying=varying),
      )
      for result, spec in zip(abstract_eval(*avals, **params), factors.result_specs(assignment))
    ]

  # The kernel on one shard's operands (the whole arrays when nothing is split).
  local = Primitive(f"{name}_local")
  local.multiple_results = True
  local.def_abstract_eval(typed_abstract_eval)
  ffi_rule = jax.ffi.ffi_lowering(target, **lowering_args)

  def local_lowering(ctx, *args, **params):
    attributes = {k: v for k, v in params.items() if k not in static_params}
    for param, table in (named_params or {}).items():
      attributes[param] = np.int32(_ffi.constants()[table][attributes[param]])
    return ffi_rule(ctx, *args, **attributes)

  mlir.register_lowering(local, local_lowering)

  primitive = Primitive(name)
  primitive.multiple_results = True
  primitive.def_impl(lambda *args, **params: _jitted_bind(primitive, tuple(params.items()))(*args))
  primitive.def_abstract_eval(typed_abstract_eval)

  def lowering(ctx, *args, **params):
    for platform in ctx.module_context.platforms:
      if not _ffi.has_target(target, platform):
        raise _ffi.missing_kernel_error(target, platform)
      if platform_check is not None:
        platform_check(platform, ctx.avals_in, params)
    factors = Factors(split_rule(*ctx.avals_in, **params), [a.shape for a in ctx.avals_in])
    partitioned = _partitioned(local, factors, params)
    return mlir.lower_fun(partitioned, multiple_results=True)(ctx, *args)

  mlir.register_lowering(primitive, lowering)
  # Partitioning needs the devices while lowering (custom_partitioning's own primitive is
  # registered alike, but it only appears inside this lowering).
  dispatch.prim_requires_devices_during_lowering.add(primitive)
  batching.primitive_batchers[primitive] = batching_rule
  ad.primitive_jvps[primitive] = _forward_only_jvp(api_name)
  return primitive


def _partitioned(local: Primitive, factors: Factors, params: dict) -> custom_partitioning:
  """`local` bound to `params`, as a function JAX's SPMD partitioners split by `factors`:
  on one device or inside a fully manual shard_map it is the kernel call itself."""
  call = custom_partitioning(lambda *operands: local.bind(*operands, **params))

  def shardings(mesh, arg_shapes):
    if mesh.empty:  # a program without a mesh: the kernel runs on whole operands
      devices = set().union(*(a.sharding.device_set for a in arg_shapes if a.sharding))
      mesh = Mesh(np.array(sorted(devices, key=lambda device: device.id)), ("devices",))
    specs = [padded_spec(a.sharding, len(a.shape)) for a in arg_shapes]
    assignment = factors.assign(specs, mesh.shape)
    named = lambda specs: [NamedSharding(mesh, spec) for spec in specs]
    return named(factors.operand_specs(assignment)), named(factors.result_specs(assignment))

  def partition(mesh, arg_shapes, result_shape):
    operand_shardings, result_shardings = shardings(mesh, arg_shapes)
    return operand_shardings[0].mesh, call.fun, result_shardings, tuple(operand_shardings)

  def infer_sharding_from_operands(mesh, arg_shapes, result_shape):  # GSPMD's propagation
    return shardings(mesh, arg_shapes)[1]

  call.def_partition(
    partition=partition,
    infer_sharding_from_operands=infer_sharding_from_operands,
    sharding_rule=factors.sdy_rule(),
  )
  return call


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
