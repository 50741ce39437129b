"""Loads the compiled extension and registers its XLA FFI handlers with JAX.

Every handler is registered under the same target name on each platform it was built for
("cpu" and "CUDA"), so the lowering rules in ``_primitives`` are platform-independent. They
are registered at import, so that a process that only deserializes a ``jax.export``ed
function finds them.
"""

from __future__ import annotations

import functools
import importlib

import jax

try:
  _ext = importlib.import_module("jax_fmha._jax_fmha_ext")
except ImportError as e:  # pragma: no cover - only without a built extension
  _ext = None
  _IMPORT_ERROR = e
else:
  _IMPORT_ERROR = None

BUILD_HINT = (
  "Install jax_fmha from source with `pip install .` (the CUDA backend is built when "
  "`nvcc` is found, or with JAX_FMHA_CUDA=ON), or pass backend='reference' to run the "
  "pure-JAX reference implementation."
)


@functools.cache
def registered_targets() -> dict[str, frozenset[str]]:
  """Registers every handler once; returns platform -> names of the targets registered."""
  if _ext is None:
    return {}
  result = {}
  ffi_platforms = constants()["platforms"]
  for platform, targets in (("cpu", _ext.cpu_targets()), ("cuda", _ext.cuda_targets())):
    for name, capsule in targets.items():
      jax.ffi.register_ffi_target(name, capsule, platform=ffi_platforms[platform])
    result[platform] = frozenset(targets)
  return result


def has_target(name: str, platform: str) -> bool:
  return name in registered_targets().get(platform, frozenset())


def missing_kernel_error(name: str, platform: str) -> RuntimeError:
  if _ext is None:
    why = f"the jax_fmha extension could not be imported ({_IMPORT_ERROR})"
  else:
    built = ", ".join(build_info()["backends"])
    why = f"this build of jax_fmha has no '{platform}' kernel for {name} (built: {built})"
  return RuntimeError(f"jax_fmha: {why}. {BUILD_HINT}")


@functools.cache
def constants() -> dict:
  """The constants Python shares with the kernels, as the extension defines them.

  Returns a dict with ``kv_layouts``, ``glu_layouts`` and ``glu_activations`` (name -> the
  number the custom calls take), ``max_head_dim``, ``max_splits``, and ``platforms`` (JAX's
  lowering platform name -> the name ``jax.ffi.register_ffi_target`` takes).
  """
  if _ext is None:
    raise missing_kernel_error("any target", "cpu")
  return _ext.constants()


def hopper_kernel_built() -> bool:
  """Whether the extension holds the sm_90a forward kernel (``build_info()["hopper_kernel"]``,
  without looking at the devices)."""
  return _ext is not None and bool(_ext.build_info()["hopper_kernel"])


def fp8_query_refusal(
  *, hopper_kernel: bool, head_dim: int, page_size: int, e4m3: bool
) -> tuple[str, str, bool] | None:
  """Why FP8 queries cannot run on the GPU, by the CUDA handler's own rules: None, or
  (argument, reason, whether the argument's dtype is the cause)."""
  if _ext is None:
    raise missing_kernel_error("any target", "cpu")
  return _ext.fp8_query_refusal(hopper_kernel, head_dim, page_size, e4m3)


def build_info() -> dict:
  """What the installed extension holds.

  Returns a dict with ``version``, ``backends`` (e.g. ``["cpu", "cuda"]``),
  ``cuda_architectures`` (empty without CUDA), ``hopper_kernel`` (whether the sm_90a
  forward kernel is built), ``jaxlib_version`` (the jaxlib whose FFI headers it was built
  against), ``jax_version`` (the jax running now), and what runs here: ``cpu_isa`` (the
  instruction set of the CPU attention kernel: baseline, avx2, avx512 or avx512bf16) and
  ``cuda_forward_kernels`` (JAX device id -> "hopper" or "portable", the forward kernel of
  each CUDA device above the decode tile's rows; empty without CUDA devices).

  Raises ValueError when ``JAX_FMHA_CPU_ISA`` names no instruction set (the CPU attention
  kernel then fails with the same message).
  """
  if _ext is None:
    raise missing_kernel_error("any target", "cpu")
  info = dict(_ext.build_info())
  info["backends"] = list(info["backends"])
  arch = info.pop("cuda_architectures")
  info["cuda_architectures"] = [a for a in arch.split(",") if a]
  info["jax_version"] = jax.__version__
  info["cpu_isa"] = _ext.cpu_isa()
  info["cuda_forward_kernels"] = {
    device.id: _ext.cuda_device_kernel(int(device.compute_capability.split(".")[0]))
    for device in _cuda_devices()
  }
  return info


def _cuda_devices() -> list:
  if not registered_targets().get("cuda"):
    return []
  try:
    return jax.devices("cuda")
  except RuntimeError:  # no CUDA backend in this jax
    return []


# Registration hands JAX function pointers only: it loads no kernel and starts no backend.
registered_targets()

FFI_TARGETS: tuple[str, ...] = tuple(sorted(frozenset().union(*registered_targets().values())))
"""The custom-call target names of this build: for ``jax.export``'s ``disabled_checks``."""
