"""How each primitive splits over a device mesh (docs/design/sharding.md).

A primitive declares a ``SplitRule``: its operand and result axes named by factors, einsum
style, and the factors its kernel can be split over. ``Factors`` is that rule for concrete
shapes; it gives JAX's SPMD partitioners what they need (Shardy's sharding rule, and the
shardings GSPMD's callbacks return) and the output shardings of explicitly sharded types,
all from one assignment of mesh axes to factors.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence, Set

from jax.experimental.custom_partitioning import (
  ArrayMapping,
  CompoundFactor,
  SdyShardingRule,
)
from jax.sharding import NamedSharding, PartitionSpec

# An axis is one factor, or several (a parenthesized group, major first).
Axis = str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SplitRule:
  """A primitive's partitioning, declared per call (shapes and parameters decide it).

  ``axes``: ``"operand, operand, ... -> result, ..."``, each array a space-separated list of
  factors, one per axis; axes that share a factor are split alike. ``(a b)`` is one axis
  made of factors ``a`` (major) and ``b``: query heads are ``(kv_heads group)``, so
  splitting them splits the KV heads alike. ``_`` is an axis of its own (an absent
  operand's placeholder). Only the `shardable` factors are split; every other axis is
  needed whole by each kernel call and stays replicated. `compound_sizes` gives the size
  of each factor that appears only inside groups.
  """

  axes: str
  shardable: Set[str]
  compound_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)


def fp8_scale_axes(scale) -> str:
  """The axes of an FP8 scale operand: ``[B, Hkv]``, splitting with the batch and the KV
  heads; an absent scale's placeholder (rank 1, empty) is an axis of its own."""
  return "batch kv_heads" if scale.ndim == 2 else "_"


def row_factors(count: int) -> list[str]:
  """Factors for `count` leading row axes of a row-by-row op, each splittable on its own."""
  return [f"rows{i}" for i in range(count)]


def _parse_array(text: str, fresh: Iterator[int]) -> tuple[Axis, ...]:
  """``"batch (kv_heads group) _"`` -> ``("batch", ("kv_heads", "group"), "unnamed0")``."""
  axes, group = [], None
  for token in re.findall(r"[()]|[^\s()]+", text):
    if token == "_":  # a factor of its own, named as Shardy requires
      token = f"unnamed{next(fresh)}"
    if token == "(":
      group = []
    elif token == ")":
      axes.append(tuple(group))
      group = None
    elif group is not None:
      group.append(token)
    else:
      axes.append(token)
  return tuple(axes)


def _spec_axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of mesh axis names (() when unsharded)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def padded_spec(sharding, ndim: int) -> tuple[tuple[str, ...], ...]:
  """The mesh axes of each of `ndim` axes under a NamedSharding's spec. Other shardings
  count as unsplit: one not known yet (GSPMD's propagation asks before deciding them all),
  or a GSPMD sharding, which JAX passes when the program has no mesh."""
  spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
  return tuple(_spec_axes(e) for e in spec) + ((),) * (ndim - len(spec))


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class _Assignment:
  """Mesh axes per factor, and for each the operand whose sharding chose them."""

  axes: dict[str, tuple[str, ...]]
  chosen_by: dict[str, int]


class Factors:
  """A SplitRule for the shapes of one call."""

  def __init__(self, rule: SplitRule, operand_shapes: Sequence[tuple[int, ...]]):
    fresh = itertools.count()
    operands, results = rule.axes.split("->")
    self.operands = [_parse_array(a, fresh) for a in operands.split(",")]
    self.results = [_parse_array(a, fresh) for a in results.split(",")]
    self.shardable = frozenset(rule.shardable)
    self.compound_sizes = dict(rule.compound_sizes)
    assert len(self.operands) == len(operand_shapes), (rule.axes, operand_shapes)
    self.sizes = dict(self.compound_sizes)
    for axes, shape in zip(self.operands, operand_shapes):
      assert len(axes) == len(shape), (rule.axes, operand_shapes)
      for axis, size in zip(axes, shape):
        if isinstance(axis, str):
          self.sizes[axis] = size
    for axes, shape in zip(self.operands, operand_shapes):  # a group's unknown major factor
      for axis, size in zip(axes, shape):
        if isinstance(axis, tuple):
          assert not self.shardable & set(axis[1:]), f"{axis}: only the major factor splits"
          self.sizes.setdefault(axis[0], size // math.prod(self.sizes[f] for f in axis[1:]))

  def assign(self, specs: Sequence[tuple[tuple[str, ...], ...]], mesh_shape: Mapping[str, int]):
    """Mesh axes for each shardable factor, from the operands' shardings in order: the
    first operand to shard a factor decides, if its mesh axes divide the factor and are
    not already used. Everything else is left for the partitioner to reshard."""
    axes_of, chosen_by, used = {}, {}, set()
    for i, (array, spec) in enumerate(zip(self.operands, specs)):
      for axis, mesh_axes in zip(array, spec):
        factor = _major(axis)
        if (
          mesh_axes
          and factor in self.shardable
          and factor not in axes_of
          and not used & set(mesh_axes)
          and self.sizes[factor] % math.prod(mesh_shape[a] for a in mesh_axes) == 0
        ):
          axes_of[factor], chosen_by[factor] = mesh_axes, i
          used |= set(mesh_axes)
    return _Assignment(axes_of, chosen_by)

  def _spec(self, array: tuple[Axis, ...], assignment: _Assignment) -> PartitionSpec:
    return PartitionSpec(*(_spec_entry(assignment.axes.get(_major(a), ())) for a in array))

  def operand_specs(self, assignment: _Assignment) -> list[PartitionSpec]:
    return [self._spec(a, assignment) for a in self.operands]

  def result_specs(self, assignment: _Assignment) -> list[PartitionSpec]:
    return [self._spec(a, assignment) for a in self.results]

  def check_explicit(
    self, specs, mesh_shape: Mapping[str, int], api_name: str, operand_names: Sequence[str]
  ) -> _Assignment:
    """The assignment for explicitly sharded operands, which must already be split as the
    kernel splits (an unsharded axis is fine: taking a shard of it is local). Raises a
    ValueError naming the first operand that is not."""
    assignment = self.assign(specs, mesh_shape)
    for i, (array, spec, expected) in enumerate(
      zip(self.operands, specs, self.operand_specs(assignment))
    ):
      for d, (axis, mesh_axes) in enumerate(zip(array, spec)):
        if mesh_axes and mesh_axes != _spec_axes(expected[d]):
          why = self._why_not(i, axis, mesh_axes, mesh_shape, assignment, operand_names)
          got = PartitionSpec(*map(_spec_entry, spec))
          raise ValueError(
            f"jax_fmha.{api_name}: {operand_names[i]} is sharded as {got}, but axis {d} "
            f"({_describe(axis)}) cannot be split over {mesh_axes}: {why}. Expected "
            f"{operand_names[i]} sharded as {expected} (reshard it, e.g. "
            f"jax.sharding.reshard({operand_names[i]}, {expected}))"
          )
    return assignment

  def _why_not(self, operand, axis, mesh_axes, mesh_shape, assignment, operand_names) -> str:
    factor = _major(axis)
    if factor not in self.shardable:
      array = self.operands[operand]
      splits = [f"{d} ({_describe(a)})" for d, a in enumerate(array) if _major(a) in self.shardable]
      where = f"on axes {', '.join(splits)} only" if splits else "on no axis"
      return f"each kernel call needs it whole ({operand_names[operand]} splits {where})"
    if factor in assignment.axes:
      by = operand_names[assignment.chosen_by[factor]]
      return f"{by} splits {factor} over {assignment.axes[factor]}"
    shards = math.prod(mesh_shape[a] for a in mesh_axes)
    if self.sizes[factor] % shards:
      return f"{factor} has {self.sizes[factor]} entries, not a multiple of {shards} shards"
    return f"mesh axes {mesh_axes} already split another factor"

  def sdy_rule(self) -> SdyShardingRule:
    """Shardy's rule: every factor not shardable needs replication."""
    to_mapping = lambda array: ArrayMapping(
      *(CompoundFactor(*a) if isinstance(a, tuple) else a for a in array)
    )
    # In order of first appearance, as Shardy numbers the factors.
    factors = dict.fromkeys(
      f for arr in self.operands + self.results for a in arr for f in _factors(a)
    )
    return SdyShardingRule(
      tuple(map(to_mapping, self.operands)),
      tuple(map(to_mapping, self.results)),
      need_replication_factors=tuple(f for f in factors if f not in self.shardable),
      **self.compound_sizes,
    )


def _major(axis: Axis) -> str:
  """The factor an axis splits through: a group's major factor (its minor ones never split)."""
  return axis if isinstance(axis, str) else axis[0]


def _factors(axis: Axis) -> tuple[str, ...]:
  return (axis,) if isinstance(axis, str) else axis


def _describe(axis: Axis) -> str:
  return " ".join(_factors(axis))
