"""Shared fixtures and helpers for the jax_fmha tests.

* ``rng``: a NumPy Generator seeded from the test's id: fresh, reproducible inputs per test.
* ``device``: every kind of device JAX has: "cpu" always, "gpu" (skipped without one), so
  the same tests run on a GPU machine. Inside a test the device is JAX's default device.
* ``randn`` / ``to_device`` / ``run_on``: inputs in a dtype, placed on a device; a call
  that skips float32 on a GPU when its kernel refuses float32 with a TypeError.
* ``assert_close`` / ``assert_attention_close``: max-abs error relative to the reference's
  scale, NaN never passes, ``-inf`` LSE exactly where the reference has it.
"""

from __future__ import annotations

import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _TESTS)  # tests/numpy_reference.py

import jax_fmha  # noqa: E402

if jax_fmha._ffi._ext is None:  # pragma: no cover - environment problem, not a test failure
  raise pytest.UsageError(
    f"jax_fmha was imported from {os.path.dirname(jax_fmha.__file__)} without its compiled "
    f"extension ({jax_fmha._ffi._IMPORT_ERROR}). Install the package first: `pip install .`"
  )

FLOAT_DTYPES = {
  "float32": np.dtype(np.float32),
  "bfloat16": np.dtype(jnp.bfloat16),
  "float16": np.dtype(np.float16),
}

# Output tolerance: max |out - ref| <= atol + rtol * max |ref| (per dtype of the inputs).
# The reference is computed in float64 from the same (rounded) inputs, so the error is the
# kernel's own: float32 accumulation, plus the rounding of the output (and, on GPUs, of the
# probabilities) to the low-precision dtype.
OUT_TOL = {
  "float32": dict(rtol=1e-5, atol=2e-5),
  "bfloat16": dict(rtol=1e-2, atol=1e-2),
  "float16": dict(rtol=2e-3, atol=2e-3),
}
# LSE is float32 for every input dtype: |lse - ref| <= atol + rtol * |ref| (elementwise).
LSE_TOL = {
  "float32": dict(rtol=2e-6, atol=2e-5),
  "bfloat16": dict(rtol=1e-5, atol=1e-4),
  "float16": dict(rtol=1e-5, atol=1e-4),
}


def dtype_name(dtype) -> str:
  return np.dtype(dtype).name


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture
def rng(request):
  """A NumPy Generator seeded from the test id (stable across runs, distinct per test)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _gpu_devices():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


@pytest.fixture
def on_cpu():
  """The test body runs with the CPU as the default device: for suites that check the API's
  semantics in float32 (the GPU attention kernels take bfloat16/float16 only), so that they
  pass on a GPU machine too."""
  with jax.default_device(jax.devices("cpu")[0]):
    yield


@pytest.fixture(params=["cpu", "gpu"])
def device(request):
  """Every JAX device kind: the test body runs with it as the default device."""
  devices = jax.devices("cpu") if request.param == "cpu" else _gpu_devices()
  if not devices:
    pytest.skip(f"no {request.param} device")
  if request.param == "gpu" and "cuda" not in jax_fmha.build_info()["backends"]:
    pytest.skip("this build of jax_fmha has no CUDA backend (see build_info())")
  with jax.default_device(devices[0]):
    yield devices[0]


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


def randn(rng, shape, dtype, scale: float = 1.0) -> np.ndarray:
  """Standard-normal values (times `scale`) rounded to `dtype`, as a NumPy array."""
  x = rng.standard_normal(shape) * scale
  return np.asarray(x, dtype=np.dtype(dtype))


def to_device(device, *xs):
  """device_put each array (NumPy arrays of any dtype, or None) onto `device`."""
  out = tuple(None if x is None else jax.device_put(x, device) for x in xs)
  return out if len(out) != 1 else out[0]


def native_dtype(device):
  """The dtype for tests that do not care about it: float32 on the CPU; bfloat16 on GPUs,
  whose kernels are half precision only."""
  return FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["bfloat16"]


def run_on(device, dtype, fn, *args, **kwargs):
  """Calls fn; on a GPU, a TypeError for float32 (the GPU kernels are bf16/fp16) skips."""
  try:
    return fn(*args, **kwargs)
  except TypeError as e:
    if device.platform != "cpu" and dtype_name(dtype) == "float32":
      pytest.skip(f"float32 not supported on {device.platform}: {e}")
    raise


# ---------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------


def as_f64(x) -> np.ndarray:
  return np.asarray(np.asarray(x).astype(np.float64))


def assert_close(actual, expected, *, rtol: float, atol: float, what: str = "output"):
  """max |actual - expected| <= atol + rtol * max |expected| over finite reference entries;
  NaN never passes; non-finite reference entries must be matched exactly."""
  a, e = as_f64(actual), as_f64(expected)
  assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
  assert not np.isnan(a).any(), f"{what}: {int(np.isnan(a).sum())} NaN entries"
  finite = np.isfinite(e)
  bad = finite & ~np.isfinite(a)
  assert not bad.any(), (
    f"{what}: {int(bad.sum())} non-finite entries where the reference "
    f"is finite, first at {np.argwhere(bad)[0].tolist()}"
  )
  mismatch = ~finite & (a != e)
  assert not mismatch.any(), (
    f"{what}: {int(mismatch.sum())} entries differ from the reference's non-finite values "
    f"(e.g. {a[mismatch][:4]} vs {e[mismatch][:4]})"
  )
  if not finite.any():
    return
  err = np.abs(a[finite] - e[finite])
  scale = float(np.abs(e[finite]).max())
  bound = atol + rtol * scale
  worst = float(err.max())
  where = np.argwhere(finite)[int(err.argmax())].tolist()
  assert worst <= bound, (
    f"{what}: max abs error {worst:.3g} at {where} exceeds "
    f"{bound:.3g} (atol {atol} + rtol {rtol} * scale {scale:.3g})"
  )


def assert_lse_close(actual, expected, dtype, what: str = "lse"):
  """Elementwise LSE check: float32, -inf exactly where expected, else within tolerance."""
  a = np.asarray(actual)
  assert a.dtype == np.float32, f"{what}: dtype {a.dtype}, expected float32"
  a, e = as_f64(a), as_f64(expected)
  assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
  assert not np.isnan(a).any(), f"{what}: {int(np.isnan(a).sum())} NaN entries"
  neg = np.isneginf(e)
  assert np.array_equal(np.isneginf(a), neg), (
    f"{what}: -inf at {np.argwhere(np.isneginf(a) != neg)[:4].tolist()} disagrees with "
    f"the reference"
  )
  assert np.isfinite(a[~neg]).all(), f"{what}: non-finite where the reference is finite"
  tol = LSE_TOL[dtype_name(dtype)]
  err = np.abs(a[~neg] - e[~neg])
  bound = tol["atol"] + tol["rtol"] * np.abs(e[~neg])
  if err.size:
    i = int((err - bound).argmax())
    assert (err <= bound).all(), (
      f"{what}: error {err[i]:.3g} exceeds {bound[i]:.3g} at {np.argwhere(~neg)[i].tolist()}"
    )


def assert_attention_close(
  out, expected_out, dtype, lse=None, expected_lse=None, empty_rows_exact: bool = True
):
  """Output (and LSE) against the float64 reference with the dtype's tolerances.

  Output dtype must be the input dtype. Where the reference LSE is -inf (the row saw no
  key) the output row must be exactly 0.
  """
  assert np.asarray(out).dtype == np.dtype(dtype), (
    f"output dtype {np.asarray(out).dtype}, expected {np.dtype(dtype)}"
  )
  assert_close(out, expected_out, what="output", **OUT_TOL[dtype_name(dtype)])
  if lse is not None:
    assert_lse_close(lse, expected_lse, dtype)
  if expected_lse is not None and empty_rows_exact:
    _assert_empty_rows_zero(out, expected_lse)


def _assert_empty_rows_zero(out, expected_lse):
  """Rows whose reference LSE is -inf must be exactly 0 in the output."""
  o = as_f64(out)
  e = np.asarray(expected_lse)
  # Dense: out [B, Sq, Hq, D], lse [B, Hq, Sq]; packed: out [Tq, Hq, D], lse [Hq, Tq].
  empty = np.isneginf(e).transpose(0, 2, 1) if o.ndim == 4 else np.isneginf(e).T
  rows = o[empty]
  assert (rows == 0).all(), (
    f"{int((rows != 0).any(axis=-1).sum())} rows that see no key are not exactly 0"
  )
