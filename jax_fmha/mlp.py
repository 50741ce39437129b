"""Fused feed-forward pieces: GLU activations (SwiGLU, GeGLU) and RMSNorm (+ residual).

Every op works on rows: the last axis is the hidden axis, any number of leading axes (none
for a 1-D input) are rows. Each is one pass over memory in the kernel, with float32
arithmetic and one rounding to the input dtype at the store. Inputs are float32, bfloat16
or float16; outputs have the input dtype. Forward only: ``jax.grad`` through a kernel
raises (``backend="reference"`` is differentiable).

The kernels are three FFI targets: ``jax_fmha_glu`` (both GLUs; the activation and the
layout of gate and up are attributes), ``jax_fmha_rms_norm`` and
``jax_fmha_rms_norm_residual``; their operands are decoded in ``ffi/common/mlp_ffi.h``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jax_fmha import _validation, reference
from jax_fmha._partitioning import SplitRule, row_factors
from jax_fmha._primitives import broadcast_batched, define_ffi_primitive, map_over_batch
from jax_fmha._validation import Backend, GluActivation, GluLayout, PackedLayout

# ---------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------


def _define_rowwise_primitive(
  target: str, abstract_eval, row_operands, split_rule, operand_names, api_name: str, **kwargs
):
  """A primitive whose first ``row_operands(params)`` operands are [..., hidden] arrays
  processed row by row; the others (a weight, an empty placeholder) are shared by all rows.

  vmap over row operands is one more leading axis (moved to the front; an unbatched row
  operand is broadcast). vmap over a shared operand falls back to one call per element.
  Rows split over a mesh; `split_rule(rows, *avals, **params)` says how the hidden axis
  does (``rows``: the leading axes' factors).
  """

  def batching(args, dims, **params):
    n = row_operands(params)
    if any(d is not None for d in dims[n:]):
      return map_over_batch(primitive, args, dims, params)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    outs = primitive.bind(*broadcast_batched(args[:n], dims[:n], size), *args[n:], **params)
    return outs, [0] * len(outs)

  def rows_split_rule(x, *avals, **params):
    rows = row_factors(x.ndim - 1)
    rule = split_rule(" ".join(rows), x, *avals, **params)
    return dataclasses.replace(rule, shardable=rule.shardable | set(rows))

  primitive = define_ffi_primitive(
    target,
    target,
    abstract_eval,
    batching,
    api_name,
    split_rule=rows_split_rule,
    operand_names=operand_names,
    **kwargs,
  )
  return primitive


def _glu_abstract_eval(gate, up, *, activation, layout):
  hidden = gate.shape[-1] if layout == "separate" else gate.shape[-1] // 2
  return (jax.ShapeDtypeStruct(gate.shape[:-1] + (hidden,), gate.dtype),)


def _glu_split_rule(rows, gate, up, *, activation, layout) -> SplitRule:
  """Elementwise over the hidden axis, which splits, except in a packed ``[gate, up]``
  concatenation (a shard would hold gates without their ups). Interleaved pairs split."""
  if layout == "separate":
    return SplitRule(f"{rows} hidden, {rows} hidden -> {rows} hidden", shardable={"hidden"})
  if layout == "interleaved":
    return SplitRule(
      f"{rows} (hidden pair), _ -> {rows} hidden", shardable={"hidden"}, compound_sizes={"pair": 2}
    )
  return SplitRule(f"{rows} gate_up, _ -> {rows} hidden", shardable=frozenset())


def _rms_norm_abstract_eval(x, weight, *, eps, weight_offset):
  return (jax.ShapeDtypeStruct(x.shape, x.dtype),)


def _rms_norm_split_rule(rows, x, weight, **params) -> SplitRule:
  # The norm is a sum over the hidden axis: each call needs it whole.
  return SplitRule(f"{rows} hidden, hidden -> {rows} hidden", shardable=frozenset())


def _rms_norm_residual_abstract_eval(x, residual, weight, *, eps, weight_offset):
  return (jax.ShapeDtypeStruct(x.shape, x.dtype),) * 2


def _rms_norm_residual_split_rule(rows, x, residual, weight, **params) -> SplitRule:
  x_axes = f"{rows} hidden"
  return SplitRule(f"{x_axes}, {x_axes}, hidden -> {x_axes}, {x_axes}", shardable=frozenset())


glu_p = _define_rowwise_primitive(
  "jax_fmha_glu",
  _glu_abstract_eval,
  row_operands=lambda params: 2 if params["layout"] == "separate" else 1,
  split_rule=_glu_split_rule,
  operand_names=("gate", "up"),
  api_name="swiglu / jax_fmha.geglu",
  named_params={"activation": "glu_activations", "layout": "glu_layouts"},
)
rms_norm_p = _define_rowwise_primitive(
  "jax_fmha_rms_norm",
  _rms_norm_abstract_eval,
  row_operands=lambda params: 1,
  split_rule=_rms_norm_split_rule,
  operand_names=("x", "weight"),
  api_name="rms_norm",
)
rms_norm_residual_p = _define_rowwise_primitive(
  "jax_fmha_rms_norm_residual",
  _rms_norm_residual_abstract_eval,
  row_operands=lambda params: 2,
  split_rule=_rms_norm_residual_split_rule,
  operand_names=("x", "residual", "weight"),
  api_name="rms_norm_residual",
)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def swiglu(
  gate: ArrayLike,
  up: ArrayLike | None = None,
  *,
  packed_layout: PackedLayout = "concat",
  backend: Backend = "auto",
) -> jax.Array:
  """``silu(gate) * up``, fused (SwiGLU, as in Llama, Qwen, Mistral).

  Args:
    gate: ``[..., H]``; or, when ``up`` is None, the packed ``gate_up [..., 2H]`` that a
      fused gate/up projection produces, laid out as ``packed_layout`` says.
    up: ``[..., H]``, gate's shape and dtype; None for the packed form.
    packed_layout: ``"concat"``: each row is ``[gate (H), up (H)]``, i.e.
      ``gate = gate_up[..., :H]``, ``up = gate_up[..., H:]`` (a projection whose gate and
      up weights are concatenated along the output axis); ``"interleaved"``: each row is
      ``g0, u0, g1, u1, ...``, i.e. ``gate = gate_up[..., 0::2]``,
      ``up = gate_up[..., 1::2]``. Only read for the packed form.
    backend: ``"auto"``: the jax_fmha kernel of the platform the computation is placed on;
      ``"reference"``: the pure-JAX ``jax_fmha.reference.swiglu``.

  Returns:
    ``[..., H]`` in the input dtype.
  """
  return _glu(gate, up, "silu", packed_layout, backend)


def geglu(
  gate: ArrayLike,
  up: ArrayLike | None = None,
  *,
  approximate: bool = True,
  packed_layout: PackedLayout = "concat",
  backend: Backend = "auto",
) -> jax.Array:
  """``gelu(gate) * up``, fused (GeGLU, as in Gemma).

  ``approximate=True`` uses the tanh approximation
  ``gelu(x) = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``, False the exact
  ``gelu(x) = x/2 * (1 + erf(x / sqrt(2)))`` (``jax.nn.gelu``'s two forms). The arguments
  are those of ``swiglu``, packed forms included.
  """
  approximate = _validation.static_bool("approximate", approximate)
  return _glu(gate, up, "gelu_tanh" if approximate else "gelu_erf", packed_layout, backend)


def rms_norm(
  x: ArrayLike,
  weight: ArrayLike,
  eps: float = 1e-6,
  weight_offset: float = 0.0,
  *,
  backend: Backend = "auto",
) -> jax.Array:
  """``x * rsqrt(mean(x^2, axis=-1) + eps) * (weight + weight_offset)``, fused.

  Args:
    x: ``[..., H]``, float32, bfloat16 or float16.
    weight: ``[H]``, in x's dtype or float32 (a float32 weight is not rounded to x's dtype).
    eps: added to the mean square; a Python float > 0.
    weight_offset: added to the weight (1.0 is Gemma's convention of a zero-centered
      weight); a Python float.
    backend: ``"auto"`` (the kernel) or ``"reference"`` (``jax_fmha.reference.rms_norm``).

  Returns:
    ``[..., H]`` in x's dtype.
  """
  x, _, weight, eps, weight_offset = _validation.rms_norm(
    x, None, weight, eps, weight_offset, backend
  )
  if backend == "reference":
    return reference.rms_norm(x, weight, eps, weight_offset)
  return rms_norm_p.bind(x, weight, eps=np.float32(eps), weight_offset=np.float32(weight_offset))[0]


def rms_norm_residual(
  x: ArrayLike,
  residual: ArrayLike,
  weight: ArrayLike,
  eps: float = 1e-6,
  weight_offset: float = 0.0,
  *,
  backend: Backend = "auto",
) -> tuple[jax.Array, jax.Array]:
  """``h = x + residual``, ``y = rms_norm(h, weight, eps, weight_offset)``, in one pass.

  ``h`` is rounded to the input dtype, as a framework stores it, and ``y`` normalizes that
  rounded ``h``. ``residual`` has x's shape and dtype; the other arguments are those of
  ``rms_norm``.

  Returns:
    ``(y, h)``, both x's shape and dtype; ``h`` is the next block's residual stream.
  """
  x, residual, weight, eps, weight_offset = _validation.rms_norm(
    x, residual, weight, eps, weight_offset, backend
  )
  if backend == "reference":
    return reference.rms_norm_residual(x, residual, weight, eps, weight_offset)
  y, h = rms_norm_residual_p.bind(
    x, residual, weight, eps=np.float32(eps), weight_offset=np.float32(weight_offset)
  )
  return y, h


def _glu(
  gate, up, activation: GluActivation, packed_layout: PackedLayout, backend: Backend
) -> jax.Array:
  gate, up, layout = _validation.glu(gate, up, packed_layout, backend)
  if backend == "reference":
    if layout != "separate":
      gate, up = _split_packed(gate, layout)
    if activation == "silu":
      return reference.swiglu(gate, up)
    return reference.geglu(gate, up, approximate=activation == "gelu_tanh")
  if layout != "separate":
    up = jnp.zeros((0,), gate.dtype)  # the packed form has no up operand
  return glu_p.bind(gate, up, activation=activation, layout=layout)[0]


def _split_packed(gate_up, layout: GluLayout):
  if layout == "interleaved":
    return gate_up[..., 0::2], gate_up[..., 1::2]
  hidden = gate_up.shape[-1] // 2
  return gate_up[..., :hidden], gate_up[..., hidden:]
