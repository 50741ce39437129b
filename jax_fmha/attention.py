"""``jax_fmha.attention``: the flash-attention forward, and the split-KV merge."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from jax_fmha import _checks, _primitives, reference

BACKENDS = ("auto", "reference")
MAX_SPLITS = 256


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int | None = None,
              max_seqlen_k: int | None = None, block_table=None, seq_lens=None,
              num_splits: int | None = None, return_lse: bool = False,
              backend: str = "auto"):
  """Scaled dot-product attention, computed by a fused flash-attention kernel.

  Query layouts:
    * dense: ``q [B, Sq, Hq, D]``;
    * packed (variable length): ``q [Tq, Hq, D]`` with ``cu_seqlens_q`` int32 ``[B + 1]``
      prefix sums (first entry 0): sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.

  Key/value layouts (k and v always share one shape):
    * dense: ``k, v [B, Sk, Hkv, D]`` (with dense q);
    * packed: ``k, v [Tk, Hkv, D]`` with ``cu_seqlens_k`` int32 ``[B + 1]`` (with packed q);
    * contiguous cache: ``k, v [B, S_max, Hkv, D]`` with ``seq_lens`` int32 ``[B]``: only the
      first ``seq_lens[b]`` keys of sequence b count;
    * paged cache: ``k, v [num_pages, page_size, Hkv, D]`` with ``block_table`` int32
      ``[B, pages_per_seq]`` (logical page -> physical page) and ``seq_lens`` int32 ``[B]``.
      Any ``page_size >= 1``. Table entries past a sequence's last page are ignored.
    The caches take dense or packed queries (decode: ``Sq = 1``; chunked prefill or
    speculative decoding: ``Sq > 1``; mixed batches: packed).

  ``Hq`` must be a multiple of ``Hkv`` (MHA, GQA, MQA); query head ``h`` attends to KV head
  ``h // (Hq // Hkv)``. ``D`` is a multiple of 8, at most 256. q, k, v share one dtype
  (float32, bfloat16 or float16); the output has that dtype; softmax statistics, partial
  outputs and accumulators are float32.

  Args:
    causal: mask aligned bottom-right: query ``i`` of a sequence with ``Sq`` queries and
      ``Sk`` keys sees keys ``j <= i + Sk - Sq`` (the last query sees every key). Same as
      ``window=(left, 0)``.
    scale: multiplies ``q @ k.T``; default ``1 / sqrt(D)``.
    window: ``(left, right)``: query ``i`` sees keys in
      ``[i + Sk - Sq - left, i + Sk - Sq + right]``; ``-1`` leaves a side unbounded.
    softcap: if ``> 0``, scores become ``softcap * tanh(score / softcap)`` (after scaling,
      before masking).
    max_seqlen_q, max_seqlen_k: static bounds on the packed sequence lengths (default: the
      packed lengths ``Tq``, ``Tk``). A sequence longer than ``max_seqlen_q`` is not
      computed: its output rows are NaN.
    num_splits: split-KV (flash decoding). ``None`` chooses from static shapes and the
      device (more splits when batch x KV heads x query blocks cannot fill the device's
      multiprocessors or CPU threads); ``1`` disables; ``N`` forces N splits, merged with
      ``merge_attention_states``'s kernel.
    return_lse: also return the natural-log log-sum-exp of the scaled (softcapped) scores,
      float32 ``[B, Hq, Sq]`` (dense q) or ``[Hq, Tq]`` (packed q).
    backend: ``"auto"``: the jax_fmha kernel of the platform the computation is placed on
      (an error if that platform's kernel is not built); ``"reference"``: the pure-JAX
      implementation in ``jax_fmha.reference`` (same semantics, materializes the scores).

  Edge cases and bad device data (never read or written out of bounds):
    * a query row that sees no key gets output 0 and LSE ``-inf`` (never NaN);
    * packed query rows outside every sequence get 0 and LSE ``-inf``;
    * a sequence whose keys do not fit its storage (a page id outside
      ``[0, num_pages)`` among its first ``seq_lens[b]`` keys, ``seq_lens[b]`` negative or
      larger than the cache or the table can hold, ``cu_seqlens`` outside the arrays) is not
      computed: its output rows and LSE are NaN.

  Forward only: ``jax.grad`` through the kernel raises.

  Returns:
    ``out`` with q's shape and dtype, or ``(out, lse)`` when ``return_lse``.
  """
  problem = _check_attention(
      q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
      max_seqlen_k=max_seqlen_k, block_table=block_table, seq_lens=seq_lens,
      num_splits=num_splits, backend=backend)
  if backend == "reference":
    out, lse = reference.attention(**problem.operands(), **problem.attributes())
  else:
    out, lse = _run_kernel(problem)
  return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class _Problem:
  """Validated, canonical arguments of one attention call."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  cu_seqlens_q: jax.Array | None
  cu_seqlens_k: jax.Array | None
  seq_lens: jax.Array | None
  block_table: jax.Array | None
  scale: float
  softcap: float
  window: tuple[int, int]
  kv_layout: int
  max_seqlen_q: int
  max_seqlen_k: int
  num_splits: int | None

  def operands(self) -> dict:
    return dict(q=self.q, k=self.k, v=self.v, cu_seqlens_q=self.cu_seqlens_q,
                cu_seqlens_k=self.cu_seqlens_k, seq_lens=self.seq_lens,
                block_table=self.block_table)

  def attributes(self) -> dict:
    return dict(scale=self.scale, softcap=self.softcap, window=self.window,
                kv_layout=self.kv_layout, max_seqlen_q=self.max_seqlen_q)


def _run_kernel(p: _Problem):
  group = p.q.shape[-2] // p.k.shape[-2]
  splits = p.num_splits if p.num_splits is not None else choose_num_splits(
      batch=_batch(p), num_kv_heads=p.k.shape[-2], group=group,
      max_seqlen_q=p.max_seqlen_q, max_seqlen_k=p.max_seqlen_k,
      policy=split_policy(p.max_seqlen_q * group, _target_device(p.q)))
  out, lse = _primitives.attention_fwd(**p.operands(), **p.attributes(), num_splits=splits)
  if splits == 1:
    return out, lse
  # Partial LSEs [S, B, Hq, Sq] / [S, Hq, Tq] are put in the output's row order for the merge.
  out, lse = merge_attention_states(out, jnp.swapaxes(lse, -1, -2), out_dtype=p.q.dtype)
  return out, jnp.swapaxes(lse, -1, -2)


def _batch(p: _Problem) -> int:
  return p.cu_seqlens_q.shape[0] - 1 if p.cu_seqlens_q is not None else p.q.shape[0]


@dataclasses.dataclass(frozen=True)
class SplitPolicy:
  """How a backend's kernels fill a device, for the split-KV heuristic.

  rows_per_unit: query rows (of all heads sharing a KV head) one work unit computes;
  slots: work units the device runs at once (one wave); waves: waves to aim for when
  splitting; min_keys: fewest keys a split may get.
  """
  rows_per_unit: int
  slots: int
  waves: int
  min_keys: int


def _target_device(x) -> jax.Device:
  """The device a call on `x` will most likely run on, known at trace time: a concrete
  input's own device, else the `jax.default_device` in force, else JAX's first device."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    devices = x.devices()
    if len(devices) == 1:
      return next(iter(devices))
  default = jax.config.jax_default_device
  if isinstance(default, str):
    return jax.devices(default)[0]
  return default if default is not None else jax.devices()[0]


def split_policy(max_rows: int, device: jax.Device | None = None) -> SplitPolicy:
  """The policy of `device` (default: JAX's first device), from static information only
  (never device data, so CUDA graphs stay valid): the CPU's thread count or the GPU's
  multiprocessor count."""
  device = jax.devices()[0] if device is None else device
  if device.platform == "cpu":  # 64-row tiles (ffi/cpu/attention_kernel.h), dynamically
    # scheduled over the threads
    return SplitPolicy(rows_per_unit=64, slots=os.cpu_count() or 1, waves=2, min_keys=256)
  sms = int(getattr(device, "core_count", 0) or 132)
  # CUDA: decode-shaped problems (<= 64 rows) run 16-row tiles, 2 CTAs per SM; prefill
  # runs 128-row tiles. One wave of long splits: on an H200, one 128k sequence (8 units)
  # read 3.5 TB/s with 33 splits (one wave), 3.3 with 66 and 3.0 with 16 or 132
  # (benchmarks/results/gpu_session2_h200.md).
  return SplitPolicy(rows_per_unit=16 if max_rows <= 64 else 128, slots=2 * sms, waves=1,
                     min_keys=1024)


def choose_num_splits(*, batch: int, num_kv_heads: int, group: int, max_seqlen_q: int,
                      max_seqlen_k: int, policy: SplitPolicy | None = None) -> int:
  """Split-KV heuristic on static shapes only.

  Work units are (sequence, KV head, tile of query rows of the heads sharing the KV head).
  When they fill less than one and a half waves of the device, the keys are split so that
  about ``policy.waves`` waves run, keeping at least ``policy.min_keys`` keys per split. Of
  the split counts just below and just above that aim, the one whose last wave is fuller
  wins (a wave that is one fifth full costs as long as a full one): 64 units on 264 slots
  get 4 splits (256 CTAs), not 5 (320 CTAs, two waves).
  """
  rows = max_seqlen_q * group
  policy = split_policy(rows) if policy is None else policy
  units = batch * num_kv_heads * max(1, -(-rows // policy.rows_per_unit))
  if units == 0 or 2 * units >= 3 * policy.slots:  # nothing to do, or the device is full
    return 1
  most = max(1, min(max_seqlen_k // policy.min_keys, MAX_SPLITS))
  target = policy.waves * policy.slots

  def filled(splits: int) -> float:  # the share of the launched waves' slots with work
    ctas = units * splits
    return ctas / (-(-ctas // policy.slots) * policy.slots)

  below = min(most, max(1, target // units))
  above = min(most, -(-target // units))
  return int(max((below, above), key=filled))  # a tie keeps the fewer, longer splits


def merge_attention_states(outs, lses, *, out_dtype=None, backend: str = "auto"):
  """Merges attention results over disjoint key sets (split-KV, cascade, prefix caching).

  Args:
    outs: ``[S, ..., D]``: S partial attention outputs, each normalized over its own keys.
    lses: ``[S, ...]`` float: their log-sum-exps (``-inf`` for an empty key set).
    out_dtype: dtype of the merged output (default: ``outs.dtype``).
    backend: ``"auto"`` (kernel) or ``"reference"``.

  Returns:
    ``(out [..., D], lse [...])``: the attention over the union of the key sets. Partial
    results with LSE ``-inf`` weigh nothing; rows whose partials are all empty get 0 and
    ``-inf``. Merging is exact up to float32 rounding.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
  outs, lses = _checks.array("outs", outs), _checks.array("lses", lses)
  _checks.float_dtype("outs", outs)
  _checks.float_dtype("lses", lses)
  if outs.ndim < 2 or lses.shape != outs.shape[:-1]:
    raise ValueError(f"lses: expected shape outs.shape[:-1] = {tuple(outs.shape[:-1])} "
                     f"(outs [S, ..., D]), got {tuple(lses.shape)}")
  if outs.shape[0] < 1:
    raise ValueError("outs: expected at least one partial result on axis 0, got 0")
  out_dtype = jnp.dtype(outs.dtype if out_dtype is None else out_dtype)
  if out_dtype not in _checks.FLOAT_DTYPES:
    raise TypeError(f"out_dtype: expected float32, bfloat16 or float16, got {out_dtype}")
  outs, lses = outs.astype(jnp.float32), lses.astype(jnp.float32)
  if backend == "reference":
    out, lse = reference.merge_attention_states(outs, lses)
    return out.astype(out_dtype), lse
  if outs.shape[-1] > _checks.MAX_HEAD_DIM:
    raise ValueError(f"outs: head_dim must be at most {_checks.MAX_HEAD_DIM}, "
                     f"got {outs.shape[-1]}")
  return tuple(_primitives.merge_states_p.bind(outs, lses, out_dtype=out_dtype))


def _check_attention(q, k, v, *, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, block_table, seq_lens, num_splits,
                     backend) -> _Problem:
  """Validates the arguments; returns the canonical problem for the primitive."""
  if backend not in BACKENDS:
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
  q, k, v = (_checks.array(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.float_dtype(name, x)
  _checks.same_dtype(("q", "k", "v"), q, k, v)
  if v.shape != k.shape:
    raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")

  # Queries.
  if cu_seqlens_q is not None:
    _checks.rank("q", q, (3,), "packed [Tq, Hq, D] with cu_seqlens_q; dense q is rank 4 "
                 "and takes no cu_seqlens")
    cu_seqlens_q = _checks.int32_vector("cu_seqlens_q", cu_seqlens_q, None,
                                        "[B + 1] prefix sums")
    if cu_seqlens_q.shape[0] < 1:
      raise ValueError("cu_seqlens_q: expected shape [B + 1] with B >= 0, got (0,)")
    batch = cu_seqlens_q.shape[0] - 1
    max_seqlen_q = q.shape[0] if max_seqlen_q is None else \
        _checks.static_int("max_seqlen_q", max_seqlen_q, 0)
  else:
    if q.ndim == 3:
      raise ValueError(f"q: expected rank 4 (dense [B, Sq, Hq, D]), got shape "
                       f"{tuple(q.shape)} (rank 3): packed q [Tq, Hq, D] needs cu_seqlens_q")
    _checks.rank("q", q, (4,), "dense [B, Sq, Hq, D]")
    if max_seqlen_q is not None:
      raise ValueError(f"max_seqlen_q: only for packed q (with cu_seqlens_q), got "
                       f"{max_seqlen_q}")
    batch, max_seqlen_q = q.shape[0], q.shape[1]

  # Keys and values.
  if block_table is not None or seq_lens is not None:
    kv_layout, max_seqlen_k, block_table = _check_cache(k, cu_seqlens_k, block_table, seq_lens,
                                                        batch, max_seqlen_k)
    seq_lens = _checks.int32_vector("seq_lens", seq_lens, batch, "[B] keys per sequence")
  elif cu_seqlens_k is not None or cu_seqlens_q is not None:
    if cu_seqlens_q is None or cu_seqlens_k is None:
      raise ValueError("cu_seqlens_q and cu_seqlens_k: the packed (variable-length) form "
                       "needs both, got only "
                       + ("cu_seqlens_q" if cu_seqlens_k is None else "cu_seqlens_k"))
    _checks.rank("k", k, (3,), "packed [Tk, Hkv, D] with cu_seqlens_k")
    cu_seqlens_k = _checks.int32_vector("cu_seqlens_k", cu_seqlens_k, batch + 1,
                                        "[B + 1] prefix sums, B from cu_seqlens_q")
    max_seqlen_k = k.shape[0] if max_seqlen_k is None else \
        _checks.static_int("max_seqlen_k", max_seqlen_k, 0)
    kv_layout = _primitives.KV_PACKED
  else:
    _checks.rank("k", k, (4,), "dense [B, Sk, Hkv, D]")
    if k.shape[0] != q.shape[0]:
      raise ValueError(f"k: batch {k.shape[0]} differs from q's batch {q.shape[0]} "
                       f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    if max_seqlen_k is not None:
      raise ValueError(f"max_seqlen_k: only for packed keys (with cu_seqlens_k), got "
                       f"{max_seqlen_k}")
    kv_layout, max_seqlen_k = _primitives.KV_UNIFORM, k.shape[1]

  num_q_heads, d = q.shape[-2], q.shape[-1]
  num_kv_heads = k.shape[-2]
  _checks.head_dim("q", d)
  if k.shape[-1] != d:
    raise ValueError(f"k: head_dim {k.shape[-1]} differs from q's head_dim {d}")
  if num_kv_heads == 0 or num_q_heads % num_kv_heads:
    raise ValueError(f"k: num_kv_heads ({num_kv_heads}) must divide q's num_heads "
                     f"({num_q_heads}) for MHA/GQA/MQA")

  if not isinstance(causal, (bool, jnp.bool_)):
    raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
  window = _checks.window(window)
  if causal:
    window = (window[0], 0)
  scale = 1.0 / math.sqrt(d) if scale is None else _checks.static_float("scale", scale)
  softcap = _checks.static_float("softcap", softcap, minimum=0.0)
  if num_splits is not None:
    num_splits = _checks.static_int("num_splits", num_splits, 1)
    if num_splits > MAX_SPLITS:
      raise ValueError(f"num_splits: expected at most {MAX_SPLITS}, got {num_splits}")
  return _Problem(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                  seq_lens=seq_lens, block_table=block_table, scale=scale, softcap=softcap,
                  window=window, kv_layout=kv_layout, max_seqlen_q=max_seqlen_q,
                  max_seqlen_k=max_seqlen_k, num_splits=num_splits)


def _check_cache(k, cu_seqlens_k, block_table, seq_lens, batch, max_seqlen_k):
  """Checks a contiguous or paged cache; returns (kv_layout, bound on keys per sequence,
  block_table)."""
  if seq_lens is None:
    raise ValueError("seq_lens: a paged cache (block_table) needs seq_lens int32 [B], "
                     "got None")
  for name, value in (("cu_seqlens_k", cu_seqlens_k), ("max_seqlen_k", max_seqlen_k)):
    if value is not None:
      raise ValueError(f"{name}: not used with a KV cache (seq_lens gives the lengths), "
                       f"got {value if name == 'max_seqlen_k' else 'an array'}")
  if block_table is None:
    _checks.rank("k", k, (4,), "contiguous cache [B, S_max, Hkv, D] with seq_lens")
    if k.shape[0] != batch:
      raise ValueError(f"k: cache batch {k.shape[0]} differs from q's batch {batch}")
    return _primitives.KV_CACHE, k.shape[1], None
  _checks.rank("k", k, (4,), "pages [num_pages, page_size, Hkv, D] with block_table")
  block_table = _checks.block_table(block_table, batch)
  if k.shape[1] < 1:
    raise ValueError(f"k: page_size (axis 1 of the pages) must be >= 1, got {k.shape[1]}")
  return _primitives.KV_PAGED, block_table.shape[1] * k.shape[1], block_table
