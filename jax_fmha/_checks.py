"""Trace-time argument checks shared by the public API.

Every message names the argument, what was expected and what came, so that a wrong call
fails at trace time with a ValueError/TypeError rather than inside a kernel.
"""

from __future__ import annotations

import operator

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_HEAD_DIM = 256


def array(name: str, x):
  if x is None:
    raise TypeError(f"{name}: expected an array, got None")
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  return x


def rank(name: str, x, ranks: tuple[int, ...], meaning: str):
  if x.ndim not in ranks:
    raise ValueError(f"{name}: expected rank {' or '.join(map(str, ranks))} ({meaning}), "
                     f"got shape {tuple(x.shape)} (rank {x.ndim})")


def float_dtype(name: str, x):
  if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
    raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {x.dtype}")


def same_dtype(names: tuple[str, ...], *xs):
  dtypes = [jnp.dtype(x.dtype) for x in xs]
  if len(set(dtypes)) != 1:
    got = ", ".join(f"{n}={d}" for n, d in zip(names, dtypes))
    raise TypeError(f"{', '.join(names)} must share one dtype, got {got}")


def int32_vector(name: str, x, length: int | None, meaning: str):
  x = array(name, x)
  if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
    raise TypeError(f"{name}: expected dtype int32, got {x.dtype}")
  if x.ndim != 1 or (length is not None and x.shape[0] != length):
    want = f"[{length}]" if length is not None else "a vector"
    raise ValueError(f"{name}: expected shape {want} ({meaning}), got {tuple(x.shape)}")
  return x


def head_dim(name: str, d: int):
  if d <= 0 or d > MAX_HEAD_DIM or d % 8:
    raise ValueError(f"{name}: head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], "
                     f"got {d}")


def static_int(name: str, value, minimum: int) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name}: expected a static Python int, got {type(value).__name__} "
                    f"{value!r}") from None
  if value < minimum:
    raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
  return value


def static_float(name: str, value, minimum: float | None = None, strict: bool = False) -> float:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    raise TypeError(f"{name}: expected a static Python float, got {type(value).__name__} "
                    f"{value!r}")
  value = float(value)
  if not np.isfinite(value):
    raise ValueError(f"{name}: expected a finite number, got {value}")
  if minimum is not None and (value < minimum or (strict and value == minimum)):
    op = ">" if strict else ">="
    raise ValueError(f"{name}: expected a value {op} {minimum}, got {value}")
  return value


def window(value) -> tuple[int, int]:
  try:
    left, right = value
  except (TypeError, ValueError):
    raise ValueError(f"window: expected a pair (left, right) of ints >= -1, got {value!r}") \
        from None
  return (static_int("window[0] (left)", left, -1), static_int("window[1] (right)", right, -1))


def block_table(x, batch: int):
  x = array("block_table", x)
  if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
    raise TypeError(f"block_table: expected dtype int32, got {x.dtype}")
  if x.ndim != 2 or x.shape[0] != batch:
    raise ValueError(f"block_table: expected shape [B={batch}, pages_per_seq], got "
                     f"{tuple(x.shape)}")
  return x
