"""Tests of the fused MLP ops (swiglu, geglu, rms_norm, rms_norm_residual) against float64
NumPy references written here, on every device JAX has (conftest's `device` fixture: the
GPU cases run where there is one and skip elsewhere)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fmha

from conftest import FLOAT_DTYPES, randn, to_device

DTYPES = list(FLOAT_DTYPES)
HIDDEN_SIZES = [1, 7, 128, 4096, 5120, 14336, 11008 + 3]
PACKED_LAYOUTS = ["concat", "interleaved"]

# Elementwise |out - ref| <= atol + rtol * |ref|. rtol is a few times the kernel's float32
# error for float32, and covers one rounding of the output (half an ulp) for bf16 / fp16.
TOL = {
  "float32": dict(rtol=1e-5, atol=1e-6),
  "bfloat16": dict(rtol=1e-2, atol=1e-3),
  "float16": dict(rtol=2e-3, atol=1e-4),
}

# ---------------------------------------------------------------------------------------
# float64 NumPy references
# ---------------------------------------------------------------------------------------

_erfc = np.vectorize(math.erfc, otypes=[np.float64])

ACTIVATIONS = {
  "silu": lambda x: x / (1.0 + np.exp(-x)),
  "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
  "gelu_erf": lambda x: 0.5 * x * _erfc(-x / math.sqrt(2.0)),
}

# The jax_fmha function computing ACTIVATIONS[name](gate) * up.
GLU_FUNCTIONS = {
  "silu": jax_fmha.swiglu,
  "gelu_tanh": functools.partial(jax_fmha.geglu, approximate=True),
  "gelu_erf": functools.partial(jax_fmha.geglu, approximate=False),
}


def f64(x) -> np.ndarray:
  return np.asarray(x).astype(np.float64)


def np_glu(activation, gate, up):
  return ACTIVATIONS[activation](f64(gate)) * f64(up)


def np_rms_norm(x, weight, eps, weight_offset):
  x = f64(x)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (f64(weight) + weight_offset)


def pack(gate, up, layout):
  """The packed gate_up [..., 2H] of `layout`."""
  if layout == "concat":
    return np.concatenate([gate, up], axis=-1)
  return np.stack([gate, up], axis=-1).reshape(gate.shape[:-1] + (2 * gate.shape[-1],))


def assert_matches(actual, expected, dtype, what="output"):
  assert jnp.dtype(actual.dtype) == jnp.dtype(dtype), f"{what}: dtype {actual.dtype}"
  np.testing.assert_allclose(f64(actual), expected, **TOL[jnp.dtype(dtype).name], err_msg=what)


def rows_for(hidden):
  """Few rows for big hidden sizes: the CPU suite stays fast."""
  return 5 if hidden <= 128 else 3 if hidden <= 5120 else 2


# ---------------------------------------------------------------------------------------
# Checks shared by the tests
# ---------------------------------------------------------------------------------------


def check_glu(device, rng, activation, shape, dtype, packed_layout=None, call=None):
  gate = randn(rng, shape, dtype, scale=2.0)  # reach into the activations' tails
  up = randn(rng, shape, dtype)
  fn = call or GLU_FUNCTIONS[activation]
  if packed_layout is None:
    out = fn(*to_device(device, gate, up))
  else:
    out = fn(to_device(device, pack(gate, up, packed_layout)), packed_layout=packed_layout)
  assert out.shape == shape
  assert_matches(out, np_glu(activation, gate, up), dtype)


def check_rms_norm(
  device, rng, shape, dtype, residual, weight_dtype=None, eps=1e-6, weight_offset=0.0, call=None
):
  x = randn(rng, shape, dtype)
  weight = randn(rng, shape[-1:], weight_dtype or dtype)
  kwargs = dict(eps=eps, weight_offset=weight_offset)
  if not residual:
    y = (call or jax_fmha.rms_norm)(*to_device(device, x, weight), **kwargs)
    assert_matches(y, np_rms_norm(x, weight, eps, weight_offset), dtype)
    return
  res = randn(rng, shape, dtype)
  y, h = (call or jax_fmha.rms_norm_residual)(*to_device(device, x, res, weight), **kwargs)
  h_expected = (f64(x) + f64(res)).astype(dtype)  # rounded as it is stored
  assert_matches(h, f64(h_expected), dtype, "h")
  assert_matches(y, np_rms_norm(h_expected, weight, eps, weight_offset), dtype, "y")


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_glu(device, rng, activation, dtype, hidden):
  check_glu(device, rng, activation, (rows_for(hidden), hidden), dtype)


@pytest.mark.parametrize("hidden", [1, 7, 4096, 11008 + 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed_layout", PACKED_LAYOUTS)
def test_glu_packed(device, rng, packed_layout, dtype, hidden):
  for activation in ACTIVATIONS:
    check_glu(device, rng, activation, (rows_for(hidden), hidden), dtype, packed_layout)


# 65536: the largest row, longer than a CUDA thread block keeps in registers.
@pytest.mark.parametrize("hidden", HIDDEN_SIZES + [65536])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "rms_norm_residual"])
def test_rms_norm(device, rng, residual, dtype, hidden):
  check_rms_norm(device, rng, (rows_for(hidden), hidden), dtype, residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "rms_norm_residual"])
def test_rms_norm_float32_weight_eps_and_offset(device, rng, residual, dtype):
  check_rms_norm(
    device, rng, (3, 4096), dtype, residual, weight_dtype=np.float32, eps=0.5, weight_offset=1.0
  )
  check_rms_norm(device, rng, (3, 11008 + 3), dtype, residual, weight_offset=-0.25)


@pytest.mark.parametrize("leading", [(), (1,), (2, 3, 2)], ids=["1d", "2d", "4d"])
@pytest.mark.parametrize("hidden", [7, 128])
def test_leading_axes(device, rng, leading, hidden):
  shape = leading + (hidden,)
  dtype = FLOAT_DTYPES["bfloat16"]
  for activation in ACTIVATIONS:
    check_glu(device, rng, activation, shape, dtype)
  check_glu(device, rng, "silu", shape, dtype, "interleaved")
  for residual in (False, True):
    check_rms_norm(device, rng, shape, dtype, residual)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_backend(device, rng, dtype):
  ref = functools.partial
  for activation, fn in GLU_FUNCTIONS.items():
    check_glu(device, rng, activation, (3, 7), dtype, call=ref(fn, backend="reference"))
    check_glu(
      device, rng, activation, (3, 7), dtype, "interleaved", call=ref(fn, backend="reference")
    )
  check_rms_norm(
    device,
    rng,
    (3, 7),
    dtype,
    False,
    weight_offset=1.0,
    call=ref(jax_fmha.rms_norm, backend="reference"),
  )
  check_rms_norm(
    device,
    rng,
    (3, 7),
    dtype,
    True,
    weight_dtype=np.float32,
    call=ref(jax_fmha.rms_norm_residual, backend="reference"),
  )


# ---------------------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------------------


def test_jit(device, rng):
  dtype = FLOAT_DTYPES["bfloat16"]
  check_glu(device, rng, "silu", (4, 128), dtype, call=jax.jit(jax_fmha.swiglu))
  check_glu(
    device,
    rng,
    "gelu_erf",
    (4, 128),
    dtype,
    "concat",
    call=jax.jit(
      functools.partial(jax_fmha.geglu, approximate=False), static_argnames="packed_layout"
    ),
  )
  static = ("eps", "weight_offset")  # static floats (kernel attributes)
  check_rms_norm(
    device, rng, (4, 128), dtype, False, call=jax.jit(jax_fmha.rms_norm, static_argnames=static)
  )
  check_rms_norm(
    device,
    rng,
    (4, 128),
    dtype,
    True,
    call=jax.jit(jax_fmha.rms_norm_residual, static_argnames=static),
  )


def test_vmap(device, rng):
  dtype = FLOAT_DTYPES["float32"]
  gate, up = randn(rng, (4, 3, 64), dtype, 2.0), randn(rng, (4, 3, 64), dtype)
  expected = np_glu("silu", gate, up)
  g, u = to_device(device, gate, up)
  assert_matches(jax.vmap(jax_fmha.swiglu)(g, u), expected, dtype)
  # Batched along axis 1 of gate, up shared by every batch element.
  out = jax.vmap(jax_fmha.swiglu, in_axes=(1, None))(jnp.swapaxes(g, 0, 1), u[0])
  assert_matches(out, np_glu("silu", gate, up[:1]), dtype)
  packed = to_device(device, pack(gate, up, "interleaved"))
  out = jax.vmap(functools.partial(jax_fmha.swiglu, packed_layout="interleaved"))(packed)
  assert_matches(out, expected, dtype)

  x, res, weight = (
    randn(rng, (4, 3, 64), dtype),
    randn(rng, (4, 3, 64), dtype),
    randn(rng, (4, 64), dtype),
  )
  dx, dres, dweight = to_device(device, x, res, weight)
  out = jax.vmap(jax_fmha.rms_norm, in_axes=(0, None))(dx, dweight[0])
  assert_matches(out, np_rms_norm(x, weight[0], 1e-6, 0.0), dtype)
  # A weight per batch element: one call per element.
  out = jax.vmap(jax_fmha.rms_norm)(dx, dweight)
  assert_matches(out, np_rms_norm(x, weight[:, None], 1e-6, 0.0), dtype)
  y, h = jax.vmap(jax_fmha.rms_norm_residual, in_axes=(0, None, None))(dx, dres[0], dweight[0])
  h_expected = f64((f64(x) + f64(res[0])).astype(dtype))
  assert_matches(h, h_expected, dtype, "h")
  assert_matches(y, np_rms_norm(h_expected, weight[0], 1e-6, 0.0), dtype, "y")


def test_hlo_has_custom_call():
  gate = jnp.zeros((2, 8), jnp.bfloat16)
  weight = jnp.ones((8,), jnp.float32)
  lowered = {
    "jax_fmha_glu": jax.jit(jax_fmha.swiglu).lower(gate, gate),
    "jax_fmha_rms_norm": jax.jit(jax_fmha.rms_norm).lower(gate, weight),
    "jax_fmha_rms_norm_residual": jax.jit(jax_fmha.rms_norm_residual).lower(gate, gate, weight),
  }
  for target, lowering in lowered.items():
    assert f"custom_call @{target}(" in lowering.as_text(), target
  packed = jax.jit(functools.partial(jax_fmha.geglu, approximate=False)).lower(gate)
  assert "custom_call @jax_fmha_glu(" in packed.as_text()


def test_grad_raises():
  x = jnp.ones((2, 8), jnp.float32)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(lambda g: jax_fmha.swiglu(g, x).sum())(x)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(lambda v: jax_fmha.rms_norm(v, x[0]).sum())(x)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(lambda v: jax_fmha.rms_norm_residual(v, x, x[0])[0].sum())(x)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

_X = jnp.ones((3, 8), jnp.bfloat16)
_W = jnp.ones((8,), jnp.bfloat16)


@pytest.mark.parametrize(
  "call, error, message",
  [
    (
      lambda: jax_fmha.swiglu(_X, _X.astype(jnp.float32)),
      TypeError,
      r"gate, up must share one dtype, got gate=bfloat16, up=float32",
    ),
    (
      lambda: jax_fmha.swiglu(_X, _X[:, :4]),
      ValueError,
      r"up: expected gate's shape \(3, 8\), got \(3, 4\)",
    ),
    (
      lambda: jax_fmha.swiglu(jnp.ones((3, 8), jnp.int32)),
      TypeError,
      r"gate: expected dtype float32, bfloat16 or float16, got int32",
    ),
    (lambda: jax_fmha.swiglu(jnp.ones((), jnp.float32)), ValueError, r"gate: expected rank >= 1"),
    (
      lambda: jax_fmha.swiglu(_X[:, :7]),
      ValueError,
      r"gate: the packed gate_up \[..., 2H\] needs an even last axis, got shape \(3, 7\)",
    ),
    (
      lambda: jax_fmha.swiglu(_X, packed_layout="rows"),
      ValueError,
      r"packed_layout: expected one of \('concat', 'interleaved'\), got 'rows'",
    ),
    (
      lambda: jax_fmha.geglu(_X, _X, approximate="tanh"),
      TypeError,
      r"approximate: expected a bool, got str 'tanh'",
    ),
    (
      lambda: jax_fmha.swiglu(_X, _X, backend="triton"),
      ValueError,
      r"backend: expected one of \('auto', 'reference'\), got 'triton'",
    ),
    (
      lambda: jax_fmha.rms_norm(_X, _W[:7]),
      ValueError,
      r"weight: expected shape \(8,\) \(x's hidden size\), got \(7,\)",
    ),
    (
      lambda: jax_fmha.rms_norm(_X, _W.astype(jnp.float16)),
      TypeError,
      r"weight: expected dtype bfloat16 \(x's\) or float32, got float16",
    ),
    (
      lambda: jax_fmha.rms_norm(_X, _W, eps=0.0),
      ValueError,
      r"eps: expected a value > 0.0, got 0.0",
    ),
    (
      lambda: jax_fmha.rms_norm(_X, _W, eps=-1e-6),
      ValueError,
      r"eps: expected a value > 0.0, got -1e-06",
    ),
    (
      lambda: jax_fmha.rms_norm(_X, _W, eps=jnp.float32(1e-6)),
      TypeError,
      r"eps: expected a static Python float",
    ),
    (
      lambda: jax_fmha.rms_norm(_X, _W, weight_offset=float("nan")),
      ValueError,
      r"weight_offset: expected a finite number, got nan",
    ),
    (
      lambda: jax_fmha.rms_norm(np.ones((3, 8), np.int8), _W),
      TypeError,
      r"x: expected dtype float32, bfloat16 or float16",
    ),
    (
      lambda: jax_fmha.rms_norm_residual(_X, _X[:2], _W),
      ValueError,
      r"residual: expected x's shape \(3, 8\), got \(2, 8\)",
    ),
    (
      lambda: jax_fmha.rms_norm_residual(_X, _X.astype(jnp.float16), _W),
      TypeError,
      r"x, residual must share one dtype, got x=bfloat16, residual=float16",
    ),
  ],
)
def test_errors(call, error, message):
  with pytest.raises(error, match=message):
    call()
