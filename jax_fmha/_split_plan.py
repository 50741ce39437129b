"""Split-KV planning at trace time: which device a call will run on, and what it has.

The policy itself (each kernel's tile rows, how many of them a device runs at once, the
heuristic) lives with the kernels in C++ (ffi/common/split_policy.h) and is reached through
the extension; this module only looks the device up. See docs/design/split_kv.md.
"""

from __future__ import annotations

import os

import jax

from jax_fmha import _ffi

# Multiprocessors assumed for a GPU that does not report its count (an H100/H200's).
_DEFAULT_SM_COUNT = 132


def target_device(x) -> jax.Device:
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


def num_splits(
  *,
  batch: int,
  num_kv_heads: int,
  group: int,
  max_seqlen_q: int,
  max_seqlen_k: int,
  head_dim: int,
  page_size: int,
  device: jax.Device,
  fp8_kv: bool = False,
  fp8_q: bool = False,
) -> int:
  """Split-KV splits for a problem on `device`, from static information only (never device
  data, so CUDA graphs stay valid): the CPU's thread count, or the GPU's multiprocessor count
  and compute capability (which select the forward kernel). page_size is 0 when the keys are
  not paged; fp8_kv says the keys and values are FP8 (the Hopper kernel does not take them),
  fp8_q that the queries (and keys) are (the Hopper kernel alone takes them)."""
  if device.platform == "cpu":
    platform, parallelism, cc_major = "cpu", os.cpu_count() or 1, 0
  else:
    platform = "cuda"
    parallelism = int(getattr(device, "core_count", 0) or _DEFAULT_SM_COUNT)
    capability = getattr(device, "compute_capability", None)
    cc_major = int(str(capability).split(".")[0]) if capability else 0
  if _ffi._ext is None:
    raise _ffi.missing_kernel_error("jax_fmha_attention_fwd", platform)
  return _ffi._ext.plan_num_splits(
    platform,
    parallelism,
    cc_major,
    batch,
    num_kv_heads,
    group,
    max_seqlen_q,
    max_seqlen_k,
    head_dim,
    page_size,
    fp8_kv,
    fp8_q,
  )
