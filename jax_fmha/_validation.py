"""Trace-time argument checks of the public API, and the names its options take.

Every message names the argument, what was expected and what came, so that a wrong call
fails at trace time with a ValueError/TypeError rather than inside a kernel. The limits of
the kernels (head dim, split count) come from the extension and are checked only for
``backend="auto"``: ``backend="reference"`` runs without the extension.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

from jax_fmha import _ffi

# The names Python gives the extension's enumerations; the lowering converts them to the
# extension's numbers (``_ffi.constants()``).
Backend = Literal["auto", "reference"]
KvLayout = Literal["uniform", "packed", "cache", "paged"]
GluLayout = Literal["separate", "concat", "interleaved"]
GluActivation = Literal["silu", "gelu_tanh", "gelu_erf"]
PackedLayout = Literal["concat", "interleaved"]  # the GLU layouts of one packed gate_up

BACKENDS: tuple[str, ...] = get_args(Backend)
PACKED_LAYOUTS: tuple[str, ...] = get_args(PackedLayout)
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The FP8 storage formats (quantized KV caches and attention inputs); the kernels
# dequantize them on load.
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ---------------------------------------------------------------------------------------
# Single arguments
# ---------------------------------------------------------------------------------------


def array(name: str, x):
  if x is None:
    raise TypeError(f"{name}: expected an array, got None")
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  return x


def rank(name: str, x, ranks: tuple[int, ...], meaning: str):
  if x.ndim not in ranks:
    raise ValueError(
      f"{name}: expected rank {' or '.join(map(str, ranks))} ({meaning}), "
      f"got shape {tuple(x.shape)} (rank {x.ndim})"
    )


def float_dtype(name: str, x):
  if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
    raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {x.dtype}")


def is_fp8(x) -> bool:
  return jnp.dtype(x.dtype) in FP8_DTYPES


def kv_dtype(name: str, x):
  """Keys or values: a float dtype, or an FP8 cache format."""
  if jnp.dtype(x.dtype) not in FLOAT_DTYPES + FP8_DTYPES:
    raise TypeError(
      f"{name}: expected dtype float32, bfloat16 or float16 (q's), or an FP8 cache "
      f"(float8_e4m3fn, float8_e5m2), got {x.dtype}"
    )


def fp8_dtype(name: str, dtype):
  dtype = jnp.dtype(dtype)
  if dtype not in FP8_DTYPES:
    raise TypeError(f"{name}: expected float8_e4m3fn or float8_e5m2, got {dtype}")
  return dtype


def fp8_scale(name: str, operand: str, x, scale, batch: int, num_kv_heads: int, required: bool):
  """The dequantization scales (``scale``, the argument `name`) of the operand `operand`
  ``x``: float32 ``[B, Hkv]`` for FP8 ``x``, None otherwise (where giving one is an error).
  ``scale`` is a Python number, or a float32 scalar, ``[Hkv]`` or ``[B, Hkv]`` array,
  broadcast to ``[B, Hkv]``; None stands for 1.0 unless `required`."""
  if not is_fp8(x):
    if scale is not None:
      raise ValueError(
        f"{name}: dequantization scales are for FP8 {operand} (float8_e4m3fn, float8_e5m2), "
        f"got {operand} of dtype {x.dtype}: drop {name}"
      )
    return None
  shape = (batch, num_kv_heads)
  if scale is None:
    if required:
      raise TypeError(
        f"{name}: FP8 {operand} ({x.dtype}) needs its dequantization scale (a float32 "
        f"scalar, [Hkv] or [B, Hkv]: quantize_fp8's scale, FlashAttention-3's descale), got None"
      )
    return jnp.ones(shape, jnp.float32)
  if isinstance(scale, (bool, np.bool_)):
    raise TypeError(f"{name}: expected a float scale, got {scale!r}")
  if isinstance(scale, (int, float)):  # Python numbers: float32 (also under x64)
    return jnp.full(shape, scale, jnp.float32)
  scale = array(name, scale)
  if jnp.dtype(scale.dtype) != jnp.dtype(jnp.float32):
    raise TypeError(
      f"{name}: expected float32 (a Python float or a float32 array), got {scale.dtype}"
    )
  if scale.shape not in ((), (num_kv_heads,), shape):
    raise ValueError(
      f"{name}: expected a scalar, shape [Hkv={num_kv_heads}] (one scale per KV head) or "
      f"[B={batch}, Hkv={num_kv_heads}] (per sequence and KV head), got shape "
      f"{tuple(scale.shape)}"
    )
  return jnp.broadcast_to(scale, shape)


def query_dtypes(q, k, v):
  """The dtypes of q, k and v: one float dtype; or 16-bit/float32 q over an FP8 cache (k
  and v of one FP8 format); or FP8 q with k of q's format and v of k's or 16-bit."""
  if jnp.dtype(q.dtype) not in FLOAT_DTYPES + FP8_DTYPES:
    raise TypeError(
      f"q: expected dtype float32, bfloat16, float16 or an FP8 format (float8_e4m3fn, "
      f"float8_e5m2), got {q.dtype}"
    )
  kv_dtype("k", k)
  kv_dtype("v", v)
  if not is_fp8(q):
    same_dtype(("k", "v"), k, v)
    if not is_fp8(k):
      same_dtype(("q", "k", "v"), q, k, v)
    return
  if jnp.dtype(k.dtype) != jnp.dtype(q.dtype):
    raise TypeError(f"k: FP8 q ({q.dtype}) needs k of the same FP8 format, got {k.dtype}")
  if jnp.dtype(v.dtype) not in (jnp.dtype(k.dtype),) + HALF_DTYPES:
    raise TypeError(
      f"v: with FP8 q and k ({k.dtype}) expected v of dtype {k.dtype}, bfloat16 or float16 "
      f"(P V in that dtype), got {v.dtype}"
    )


def output_dtype(q, value):
  """The output dtype: ``value`` (default bfloat16) for FP8 q, q's otherwise."""
  if not is_fp8(q):
    if value is not None and jnp.dtype(value) != jnp.dtype(q.dtype):
      raise TypeError(
        f"out_dtype: only for FP8 q (the output has q's dtype otherwise): expected None or "
        f"{q.dtype}, got {jnp.dtype(value)}"
      )
    return jnp.dtype(q.dtype)
  if value is None:
    return jnp.dtype(jnp.bfloat16)
  if jnp.dtype(value) not in FLOAT_DTYPES:
    raise TypeError(
      f"out_dtype: expected bfloat16 (the default for FP8 q), float16 or float32, got "
      f"{jnp.dtype(value)}"
    )
  return jnp.dtype(value)


def same_dtype(names: tuple[str, ...], *xs):
  dtypes = [jnp.dtype(x.dtype) for x in xs]
  if len(set(dtypes)) != 1:
    got = ", ".join(f"{n}={d}" for n, d in zip(names, dtypes))
    raise TypeError(f"{', '.join(names)} must share one dtype, got {got}")


def int32_array(name: str, x):
  """An index array of any integer dtype (list, NumPy or jax array) as int32; values that
  do not fit int32 are the caller's error (the public docstrings say so)."""
  x = array(name, x)
  dtype = jnp.dtype(x.dtype)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{name}: expected an integer dtype (converted to int32), got {dtype}")
  return x if dtype == jnp.dtype(jnp.int32) else jnp.asarray(x, jnp.int32)


def int32_vector(name: str, x, length: int | None, meaning: str):
  x = int32_array(name, x)
  if x.ndim != 1 or (length is not None and x.shape[0] != length):
    want = f"[{length}]" if length is not None else "a vector"
    raise ValueError(f"{name}: expected shape {want} ({meaning}), got {tuple(x.shape)}")
  return x


def block_table_array(x, batch: int, page_size: int):
  x = int32_array("block_table", x)
  if x.ndim != 2 or x.shape[0] != batch:
    raise ValueError(
      f"block_table: expected shape [B={batch}, pages_per_seq], got {tuple(x.shape)}"
    )
  # The kernels address a sequence's keys with 32-bit positions (common/page_table.h).
  if x.shape[1] * page_size > _MAX_KEYS_PER_SEQUENCE:
    raise ValueError(
      f"block_table: pages_per_seq x page_size must be at most {_MAX_KEYS_PER_SEQUENCE} keys "
      f"per sequence, got {x.shape[1]} x {page_size} = {x.shape[1] * page_size}"
    )
  return x


_MAX_KEYS_PER_SEQUENCE = 2**31 - 1


def supported_head_dim(name: str, d: int, backend: Backend):
  if backend == "reference":
    if d <= 0 or d % 8:
      raise ValueError(f"{name}: head_dim must be a positive multiple of 8, got {d}")
    return
  max_head_dim = _ffi.constants()["max_head_dim"]
  if d <= 0 or d > max_head_dim or d % 8:
    raise ValueError(f"{name}: head_dim must be a multiple of 8 in [8, {max_head_dim}], got {d}")


def static_int(name: str, value, minimum: int) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(
      f"{name}: expected a static Python int, got {type(value).__name__} {value!r}"
    ) from None
  if value < minimum:
    raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
  return value


def static_float(name: str, value, minimum: float | None = None, strict: bool = False) -> float:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    raise TypeError(f"{name}: expected a static Python float, got {type(value).__name__} {value!r}")
  value = float(value)
  if not np.isfinite(value):
    raise ValueError(f"{name}: expected a finite number, got {value}")
  if minimum is not None and (value < minimum or (strict and value == minimum)):
    op = ">" if strict else ">="
    raise ValueError(f"{name}: expected a value {op} {minimum}, got {value}")
  return value


def static_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
  return bool(value)


def window_pair(value) -> tuple[int, int]:
  try:
    left, right = value
  except (TypeError, ValueError):
    raise ValueError(
      f"window: expected a pair (left, right) of ints >= -1, got {value!r}"
    ) from None
  return (static_int("window[0] (left)", left, -1), static_int("window[1] (right)", right, -1))


def known_backend(value):
  if value not in BACKENDS:
    raise ValueError(f"backend: expected one of {BACKENDS}, got {value!r}")


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionProblem:
  """Validated, canonical arguments of one attention call."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  cu_seqlens_q: jax.Array | None
  cu_seqlens_k: jax.Array | None
  seq_lens: jax.Array | None
  block_table: jax.Array | None
  q_scale: jax.Array | None  # FP8 q, k, v: float32 [B, Hkv] dequantization scales
  k_scale: jax.Array | None
  v_scale: jax.Array | None
  out_dtype: np.dtype
  scale: float
  softcap: float
  window: tuple[int, int]
  kv_layout: KvLayout
  max_seqlen_q: int
  max_seqlen_k: int
  num_splits: int | None

  @property
  def batch(self) -> int:
    return self.cu_seqlens_q.shape[0] - 1 if self.cu_seqlens_q is not None else self.q.shape[0]

  def operands(self) -> dict:
    return dict(
      q=self.q,
      k=self.k,
      v=self.v,
      cu_seqlens_q=self.cu_seqlens_q,
      cu_seqlens_k=self.cu_seqlens_k,
      seq_lens=self.seq_lens,
      block_table=self.block_table,
      q_scale=self.q_scale,
      k_scale=self.k_scale,
      v_scale=self.v_scale,
    )

  def attributes(self) -> dict:
    return dict(
      out_dtype=self.out_dtype,
      scale=self.scale,
      softcap=self.softcap,
      window=self.window,
      kv_layout=self.kv_layout,
      max_seqlen_q=self.max_seqlen_q,
    )


def attention(
  q,
  k,
  v,
  *,
  causal,
  scale,
  window,
  softcap,
  cu_seqlens_q,
  cu_seqlens_k,
  max_seqlen_q,
  max_seqlen_k,
  block_table,
  seq_lens,
  num_splits,
  q_scale,
  k_scale,
  v_scale,
  out_dtype: jax.typing.DTypeLike | None,
  backend,
) -> AttentionProblem:
  """Checks the arguments of ``jax_fmha.attention``; returns the canonical problem."""
  known_backend(backend)
  q, k, v = (array(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
  query_dtypes(q, k, v)
  out_dtype = output_dtype(q, out_dtype)
  if v.shape != k.shape:
    raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")

  cu_seqlens_q, batch, max_seqlen_q = _queries(q, cu_seqlens_q, max_seqlen_q)
  kv_layout, cu_seqlens_k, seq_lens, block_table, max_seqlen_k = _keys(
    q, k, cu_seqlens_q, cu_seqlens_k, seq_lens, block_table, batch, max_seqlen_k
  )
  _heads(q, k, backend)
  q_scale, k_scale, v_scale = (
    fp8_scale(name, operand, x, value, batch, k.shape[-2], required=operand == "q")
    for name, operand, x, value in (
      ("q_scale", "q", q, q_scale),
      ("k_scale", "k", k, k_scale),
      ("v_scale", "v", v, v_scale),
    )
  )
  window, scale, softcap, num_splits = _transform(
    q.shape[-1], causal, window, scale, softcap, num_splits, backend
  )
  return AttentionProblem(
    q=q,
    k=k,
    v=v,
    cu_seqlens_q=cu_seqlens_q,
    cu_seqlens_k=cu_seqlens_k,
    seq_lens=seq_lens,
    block_table=block_table,
    q_scale=q_scale,
    k_scale=k_scale,
    v_scale=v_scale,
    out_dtype=out_dtype,
    scale=scale,
    softcap=softcap,
    window=window,
    kv_layout=kv_layout,
    max_seqlen_q=max_seqlen_q,
    max_seqlen_k=max_seqlen_k,
    num_splits=num_splits,
  )


def _queries(q, cu_seqlens_q, max_seqlen_q):
  """Checks dense or packed queries; returns (cu_seqlens_q, batch, max_seqlen_q)."""
  if cu_seqlens_q is not None:
    rank(
      "q",
      q,
      (3,),
      "packed [Tq, Hq, D] with cu_seqlens_q; dense q is rank 4 and takes no cu_seqlens",
    )
    cu_seqlens_q = int32_vector("cu_seqlens_q", cu_seqlens_q, None, "[B + 1] prefix sums")
    if cu_seqlens_q.shape[0] < 1:
      raise ValueError("cu_seqlens_q: expected shape [B + 1] with B >= 0, got (0,)")
    batch = cu_seqlens_q.shape[0] - 1
    max_seqlen_q = (
      q.shape[0] if max_seqlen_q is None else static_int("max_seqlen_q", max_seqlen_q, 0)
    )
  else:
    if q.ndim == 3:
      raise ValueError(
        f"q: expected rank 4 (dense [B, Sq, Hq, D]), got shape "
        f"{tuple(q.shape)} (rank 3): packed q [Tq, Hq, D] needs cu_seqlens_q"
      )
    rank("q", q, (4,), "dense [B, Sq, Hq, D]")
    if max_seqlen_q is not None:
      raise ValueError(f"max_seqlen_q: only for packed q (with cu_seqlens_q), got {max_seqlen_q}")
    batch, max_seqlen_q = q.shape[0], q.shape[1]
  return cu_seqlens_q, batch, max_seqlen_q


def _keys(q, k, cu_seqlens_q, cu_seqlens_k, seq_lens, block_table, batch, max_seqlen_k):
  """Checks the keys' layout against the queries'; returns (kv_layout, cu_seqlens_k,
  seq_lens, block_table, max_seqlen_k)."""
  if block_table is not None or seq_lens is not None:
    kv_layout, max_seqlen_k, block_table = _kv_cache(
      k, cu_seqlens_k, block_table, seq_lens, batch, max_seqlen_k
    )
    seq_lens = int32_vector("seq_lens", seq_lens, batch, "[B] keys per sequence")
  elif cu_seqlens_k is not None or cu_seqlens_q is not None:
    if cu_seqlens_q is None or cu_seqlens_k is None:
      raise ValueError(
        "cu_seqlens_q and cu_seqlens_k: the packed (variable-length) form "
        "needs both, got only " + ("cu_seqlens_q" if cu_seqlens_k is None else "cu_seqlens_k")
      )
    rank("k", k, (3,), "packed [Tk, Hkv, D] with cu_seqlens_k")
    cu_seqlens_k = int32_vector(
      "cu_seqlens_k", cu_seqlens_k, batch + 1, "[B + 1] prefix sums, B from cu_seqlens_q"
    )
    max_seqlen_k = (
      k.shape[0] if max_seqlen_k is None else static_int("max_seqlen_k", max_seqlen_k, 0)
    )
    kv_layout = "packed"
  else:
    rank("k", k, (4,), "dense [B, Sk, Hkv, D]")
    if k.shape[0] != q.shape[0]:
      raise ValueError(
        f"k: batch {k.shape[0]} differs from q's batch {q.shape[0]} "
        f"(q {tuple(q.shape)}, k {tuple(k.shape)})"
      )
    if max_seqlen_k is not None:
      raise ValueError(
        f"max_seqlen_k: only for packed keys (with cu_seqlens_k), got {max_seqlen_k}"
      )
    kv_layout, max_seqlen_k = "uniform", k.shape[1]
  return kv_layout, cu_seqlens_k, seq_lens, block_table, max_seqlen_k


def _heads(q, k, backend):
  """Checks the head dim and the query/KV head counts (MHA, GQA, MQA)."""
  num_q_heads, d = q.shape[-2], q.shape[-1]
  num_kv_heads = k.shape[-2]
  supported_head_dim("q", d, backend)
  if k.shape[-1] != d:
    raise ValueError(f"k: head_dim {k.shape[-1]} differs from q's head_dim {d}")
  if num_kv_heads == 0 or num_q_heads % num_kv_heads:
    raise ValueError(
      f"k: num_kv_heads ({num_kv_heads}) must divide q's num_heads ({num_q_heads}) for MHA/GQA/MQA"
    )


def _transform(d, causal, window, scale, softcap, num_splits, backend):
  """Checks the score transform, the mask and the split count; returns (window, scale,
  softcap, num_splits) with causal folded into the window."""
  causal = static_bool("causal", causal)
  window = window_pair(window)
  if causal:
    window = (window[0], 0)
  scale = 1.0 / math.sqrt(d) if scale is None else static_float("scale", scale)
  softcap = static_float("softcap", softcap, minimum=0.0)
  if num_splits is not None:
    num_splits = static_int("num_splits", num_splits, 1)
    max_splits = _ffi.constants()["max_splits"] if backend == "auto" else None
    if max_splits is not None and num_splits > max_splits:
      raise ValueError(f"num_splits: expected at most {max_splits}, got {num_splits}")
  return window, scale, softcap, num_splits


def _kv_cache(k, cu_seqlens_k, block_table, seq_lens, batch, max_seqlen_k):
  """Checks a contiguous or paged cache as attention's keys; returns (kv_layout, bound on
  keys per sequence, block_table)."""
  if seq_lens is None:
    raise ValueError("seq_lens: a paged cache (block_table) needs seq_lens int32 [B], got None")
  for name, value in (("cu_seqlens_k", cu_seqlens_k), ("max_seqlen_k", max_seqlen_k)):
    if value is not None:
      raise ValueError(
        f"{name}: not used with a KV cache (seq_lens gives the lengths), "
        f"got {value if name == 'max_seqlen_k' else 'an array'}"
      )
  if block_table is None:
    rank("k", k, (4,), "contiguous cache [B, S_max, Hkv, D] with seq_lens")
    if k.shape[0] != batch:
      raise ValueError(f"k: cache batch {k.shape[0]} differs from q's batch {batch}")
    return "cache", k.shape[1], None
  rank("k", k, (4,), "pages [num_pages, page_size, Hkv, D] with block_table")
  if k.shape[1] < 1:
    raise ValueError(f"k: page_size (axis 1 of the pages) must be >= 1, got {k.shape[1]}")
  block_table = block_table_array(block_table, batch, k.shape[1])
  return "paged", block_table.shape[1] * k.shape[1], block_table


# ---------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------


class KvCacheUpdate(NamedTuple):
  """Validated arguments of one cache append."""

  k_cache: jax.Array
  v_cache: jax.Array
  k_new: jax.Array
  v_new: jax.Array
  block_table: jax.Array | None
  cache_seqlens: jax.Array
  cu_seqlens_new: jax.Array | None
  kv_layout: KvLayout
  k_scale: jax.Array | None  # FP8 caches: float32 [B, Hkv] quantization scales
  v_scale: jax.Array | None


def update_kv_cache(
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
) -> KvCacheUpdate:
  """Checks the arguments of ``jax_fmha.update_kv_cache``."""
  known_backend(backend)
  k_cache, v_cache, k_new, v_new = (
    array(n, x)
    for n, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new))
  )
  kv_dtype("k_cache", k_cache)
  kv_dtype("v_cache", v_cache)
  float_dtype("k_new", k_new)
  float_dtype("v_new", v_new)
  same_dtype(("k_cache", "v_cache"), k_cache, v_cache)
  same_dtype(("k_new", "v_new"), k_new, v_new)
  if not is_fp8(k_cache):
    same_dtype(("k_cache", "v_cache", "k_new", "v_new"), k_cache, v_cache, k_new, v_new)
  rank(
    "k_cache",
    k_cache,
    (4,),
    "pages [num_pages, page_size, Hkv, D] or a contiguous cache [B, S_max, Hkv, D]",
  )
  if v_cache.shape != k_cache.shape:
    raise ValueError(
      f"v_cache: expected k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
    )
  if v_new.shape != k_new.shape:
    raise ValueError(
      f"v_new: expected k_new's shape {tuple(k_new.shape)}, got {tuple(v_new.shape)}"
    )
  if cu_seqlens_new is not None:
    rank("k_new", k_new, (3,), "packed [T_new, Hkv, D] with cu_seqlens_new")
    cu_seqlens_new = int32_vector("cu_seqlens_new", cu_seqlens_new, None, "[B + 1] prefix sums")
    batch = cu_seqlens_new.shape[0] - 1
  else:
    rank("k_new", k_new, (4,), "dense [B, S_new, Hkv, D]; packed new tokens need cu_seqlens_new")
    batch = k_new.shape[0]
  if k_new.shape[-2:] != k_cache.shape[-2:]:
    raise ValueError(
      f"k_new: heads and head_dim {tuple(k_new.shape[-2:])} differ from the "
      f"cache's {tuple(k_cache.shape[-2:])}"
    )
  cache_seqlens = int32_vector(
    "cache_seqlens", cache_seqlens, batch, "[B] tokens already cached per sequence"
  )
  if block_table is not None:
    block_table = block_table_array(block_table, batch, k_cache.shape[1])
    kv_layout = "paged"
  else:
    if k_cache.shape[0] != batch:
      raise ValueError(
        f"k_cache: contiguous cache batch {k_cache.shape[0]} differs from "
        f"the new tokens' batch {batch}"
      )
    kv_layout = "cache"
  k_scale, v_scale = (
    fp8_scale(name, operand, cache, value, batch, k_cache.shape[-2], required=False)
    for name, operand, cache, value in (
      ("k_scale", "k_cache", k_cache, k_scale),
      ("v_scale", "v_cache", v_cache, v_scale),
    )
  )
  return KvCacheUpdate(
    k_cache,
    v_cache,
    k_new,
    v_new,
    block_table,
    cache_seqlens,
    cu_seqlens_new,
    kv_layout,
    k_scale,
    v_scale,
  )


def attention_with_kvcache(k_new, v_new, cache_seqlens, cu_seqlens_q, block_table):
  """Checks what ``jax_fmha.attention_with_kvcache`` adds to its two calls; returns
  (cache_seqlens, cu_seqlens_q, block_table) as int32, converted once for both calls."""
  if (k_new is None) != (v_new is None):
    raise ValueError("k_new and v_new: give both or neither")
  cache_seqlens = int32_vector(
    "cache_seqlens", cache_seqlens, None, "[B] tokens already cached per sequence"
  )
  if cu_seqlens_q is not None:
    cu_seqlens_q = int32_array("cu_seqlens_q", cu_seqlens_q)
  if block_table is not None:
    block_table = int32_array("block_table", block_table)
  return cache_seqlens, cu_seqlens_q, block_table


# ---------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------


def merge_attention_states(outs, lses, out_dtype, backend):
  """Checks the arguments of ``jax_fmha.merge_attention_states``; returns (outs, lses) as
  float32 and the output dtype."""
  known_backend(backend)
  outs, lses = array("outs", outs), array("lses", lses)
  float_dtype("outs", outs)
  float_dtype("lses", lses)
  if outs.ndim == 5:  # dense [S, B, Sq, Hq, D]
    s, b, sq, hq, _ = outs.shape
    want, form = (s, b, hq, sq), "dense: outs [S, B, Sq, Hq, D], lses [S, B, Hq, Sq]"
  elif outs.ndim == 4:  # packed [S, Tq, Hq, D]
    s, tq, hq, _ = outs.shape
    want, form = (s, hq, tq), "packed: outs [S, Tq, Hq, D], lses [S, Hq, Tq]"
  else:
    raise ValueError(
      f"outs: expected rank 5 (dense [S, B, Sq, Hq, D]) or 4 (packed [S, Tq, Hq, D]): "
      f"attention's outputs stacked on a leading axis, got shape {tuple(outs.shape)} "
      f"(lses {tuple(lses.shape)})"
    )
  if tuple(lses.shape) != want:
    raise ValueError(
      f"lses: expected shape {want} for outs {tuple(outs.shape)} ({form}, attention's "
      f"LSE layout), got {tuple(lses.shape)}"
    )
  if outs.shape[0] < 1:
    raise ValueError("outs: expected at least one partial result on axis 0, got 0")
  out_dtype = jnp.dtype(outs.dtype if out_dtype is None else out_dtype)
  if out_dtype not in FLOAT_DTYPES:
    raise TypeError(f"out_dtype: expected float32, bfloat16 or float16, got {out_dtype}")
  max_head_dim = _ffi.constants()["max_head_dim"] if backend == "auto" else None
  if max_head_dim is not None and outs.shape[-1] > max_head_dim:
    raise ValueError(f"outs: head_dim must be at most {max_head_dim}, got {outs.shape[-1]}")
  return outs.astype(jnp.float32), lses.astype(jnp.float32), out_dtype


# ---------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------


def _rowwise_array(name: str, x, meaning: str):
  """An array of float dtype and rank >= 1."""
  x = array(name, x)
  float_dtype(name, x)
  if x.ndim < 1:
    raise ValueError(f"{name}: expected rank >= 1 ({meaning}), got a scalar")
  return x


def glu(gate, up, packed_layout, backend) -> tuple[jax.Array, jax.Array | None, GluLayout]:
  """Checks the arguments of ``jax_fmha.swiglu``/``geglu``; returns (gate, up, layout)."""
  known_backend(backend)
  if packed_layout not in PACKED_LAYOUTS:
    raise ValueError(f"packed_layout: expected one of {PACKED_LAYOUTS}, got {packed_layout!r}")
  if up is None:
    gate = _rowwise_array("gate", gate, "the packed gate_up [..., 2H]")
    if gate.shape[-1] % 2:
      raise ValueError(
        f"gate: the packed gate_up [..., 2H] needs an even last axis, got shape {tuple(gate.shape)}"
      )
    return gate, None, packed_layout
  gate = _rowwise_array("gate", gate, "[..., H]")
  up = _rowwise_array("up", up, "[..., H]")
  same_dtype(("gate", "up"), gate, up)
  if up.shape != gate.shape:
    raise ValueError(f"up: expected gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
  return gate, up, "separate"


def rms_norm(x, residual, weight, eps, weight_offset, backend):
  """Checks the arguments of ``jax_fmha.rms_norm``/``rms_norm_residual`` (residual None
  for the former); returns (x, residual, weight, eps, weight_offset)."""
  known_backend(backend)
  x = _rowwise_array("x", x, "[..., H]")
  if residual is not None:
    residual = _rowwise_array("residual", residual, "[..., H]")
    same_dtype(("x", "residual"), x, residual)
    if residual.shape != x.shape:
      raise ValueError(
        f"residual: expected x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
      )
  weight = array("weight", weight)
  if jnp.dtype(weight.dtype) not in (jnp.dtype(x.dtype), jnp.dtype(jnp.float32)):
    raise TypeError(
      f"weight: expected dtype {jnp.dtype(x.dtype)} (x's) or float32, got {weight.dtype}"
    )
  if weight.shape != (x.shape[-1],):
    raise ValueError(
      f"weight: expected shape ({x.shape[-1]},) (x's hidden size), got {tuple(weight.shape)}"
    )
  eps = static_float("eps", eps, minimum=0.0, strict=True)
  weight_offset = static_float("weight_offset", weight_offset)
  return x, residual, weight, eps, weight_offset
