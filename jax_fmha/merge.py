"""``jax_fmha.merge_attention_states``: merging attention results over disjoint key sets,
and its primitive (also the last step of split-KV attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jax_fmha import _validation, reference
from jax_fmha._partitioning import SplitRule, row_factors
from jax_fmha._primitives import broadcast_batched, define_ffi_primitive
from jax_fmha._validation import Backend


def merge_attention_states(
  outs: ArrayLike, lses: ArrayLike, *, out_dtype: DTypeLike | None = None, backend: Backend = "auto"
) -> tuple[jax.Array, jax.Array]:
  """Merges attention results over disjoint key sets (split-KV, cascade, prefix caching).

  Takes what ``attention(..., return_lse=True)`` returns, stacked on a new leading axis of S
  partial results (one per key set), in ``attention``'s layouts:

  * dense: ``outs [S, B, Sq, Hq, D]``, ``lses [S, B, Hq, Sq]``;
  * packed: ``outs [S, Tq, Hq, D]``, ``lses [S, Hq, Tq]``.

  Args:
    outs: the S partial attention outputs, each normalized over its own keys.
    lses: their float log-sum-exps (``-inf`` for a row that saw no key).
    out_dtype: dtype of the merged output (default: ``outs.dtype``).
    backend: ``"auto"`` (kernel) or ``"reference"``.

  Returns:
    ``(out, lse)`` in ``attention``'s layout (``out [B, Sq, Hq, D]``, ``lse [B, Hq, Sq]``;
    packed ``out [Tq, Hq, D]``, ``lse [Hq, Tq]``, float32): the attention over the union
    of the key sets. Partial results with LSE ``-inf`` weigh nothing; rows whose partials
    are all empty get 0 and ``-inf``. Merging is exact up to float32 rounding.
  """
  outs, lses, out_dtype = _validation.merge_attention_states(outs, lses, out_dtype, backend)
  # The merge runs row by row: LSEs [S, ..., Hq, Sq] put in the outputs' row order.
  lses = jnp.swapaxes(lses, -1, -2)
  if backend == "reference":
    out, lse = reference.merge_attention_states(outs, lses)
    out = out.astype(out_dtype)
  else:
    out, lse = merge_states_p.bind(outs, lses, out_dtype=out_dtype)
  return out, jnp.swapaxes(lse, -1, -2)


# ---------------------------------------------------------------------------------------
# The merge primitive
# ---------------------------------------------------------------------------------------


def _merge_abstract_eval(partial_out, partial_lse, *, out_dtype):
  return (
    jax.ShapeDtypeStruct(partial_out.shape[1:], out_dtype),
    jax.ShapeDtypeStruct(partial_lse.shape[1:], jnp.float32),
  )


def _merge_split_rule(partial_out, partial_lse, *, out_dtype) -> SplitRule:
  """Row by row: every axis but the partial results' (merged) and the head dimension
  splits."""
  rows = row_factors(partial_lse.ndim - 1)
  axes = " ".join(rows)
  return SplitRule(
    f"splits {axes} head_dim, splits {axes} -> {axes} head_dim, {axes}", shardable=set(rows)
  )


def _merge_batching(args, dims, *, out_dtype):
  # Row-wise over every axis but the leading split axis: the vmapped axis becomes axis 1.
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  partial_out, partial_lse = (jnp.moveaxis(x, 0, 1) for x in broadcast_batched(args, dims, size))
  outs = merge_states_p.bind(partial_out, partial_lse, out_dtype=out_dtype)
  return list(outs), [0, 0]


merge_states_p = define_ffi_primitive(
  "jax_fmha_merge_states",
  "jax_fmha_merge_states",
  _merge_abstract_eval,
  _merge_batching,
  api_name="merge_attention_states",
  split_rule=_merge_split_rule,
  operand_names=("outs", "lses"),
  static_params=("out_dtype",),
)
