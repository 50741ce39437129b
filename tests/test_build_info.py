"""build_info() reports what the build holds and what runs here; the environment knobs
(JAX_FMHA_CPU_ISA, JAX_FMHA_CUDA_FORWARD, and the build's JAX_FMHA_CUDA) reject unknown
values with a message naming the setting, the value and the accepted values."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import pytest

import jax_fmha

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ("baseline", "avx2", "avx512", "avx512bf16")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
  # The CPU ISA is chosen once per process: a fresh one for every value. The knob concerns
  # the CPU kernels, so the process runs on the CPU backend, also on a GPU machine.
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    cwd=_ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
    capture_output=True,
    text=True,
    timeout=300,
  )


def cuda_devices() -> list:
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


def test_build_info_keys_and_values():
  info = jax_fmha.build_info()
  assert set(info) == {
    "version",
    "backends",
    "cuda_architectures",
    "hopper_kernel",
    "jaxlib_version",
    "jax_version",
    "cpu_isa",
    "cuda_forward_kernels",
  }
  assert info["version"] == jax_fmha.__version__
  assert "cpu" in info["backends"]
  assert info["jax_version"] == jax.__version__
  assert info["cpu_isa"] in ISAS
  assert isinstance(info["hopper_kernel"], bool)
  if "cuda" not in info["backends"]:
    assert info["cuda_architectures"] == [] and not info["hopper_kernel"]
  kernels = info["cuda_forward_kernels"]
  devices = cuda_devices() if "cuda" in info["backends"] else []
  assert set(kernels) == {d.id for d in devices}
  for d in devices:
    hopper = info["hopper_kernel"] and d.compute_capability.split(".")[0] == "9"
    assert kernels[d.id] == ("hopper" if hopper else "portable")


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_devices(), reason="needs a CUDA device")
def test_cuda_forward_portable_forced(monkeypatch):
  monkeypatch.setenv("JAX_FMHA_CUDA_FORWARD", "portable")
  assert set(jax_fmha.build_info()["cuda_forward_kernels"].values()) == {"portable"}


def test_cpu_isa_cap_is_what_runs():
  """JAX_FMHA_CPU_ISA=baseline: build_info reports it, and the kernel runs."""
  result = run_python(
    """
    import jax.numpy as jnp
    import jax_fmha

    print(jax_fmha.build_info()["cpu_isa"])
    q = jnp.ones((1, 4, 2, 8))
    print(float(jax_fmha.attention(q, q, q).sum()))
    """,
    JAX_FMHA_CPU_ISA="baseline",
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["baseline", "64.0"]


def test_unknown_cpu_isa_is_an_error():
  """An unknown JAX_FMHA_CPU_ISA: build_info() raises ValueError, and the CPU attention
  kernel fails at its call with the same message; other kernels and the reference run."""
  result = run_python(
    """
    import jax.numpy as jnp
    import jax_fmha

    try:
      jax_fmha.build_info()
    except ValueError as e:
      print("build_info:", e)
    q = jnp.ones((1, 4, 2, 8))
    assert jax_fmha.attention(q, q, q, backend="reference").shape == q.shape
    assert jax_fmha.swiglu(q).shape == (1, 4, 2, 4)
    try:
      jax_fmha.attention(q, q, q).block_until_ready()
    except Exception as e:
      print("attention:", e)
    """,
    JAX_FMHA_CPU_ISA="avx3",
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert [line.split(":")[0] for line in lines] == ["build_info", "attention"]
  for line in lines:
    assert "JAX_FMHA_CPU_ISA='avx3'" in line
    assert "baseline, avx2, avx512, avx512bf16" in line


def test_empty_cpu_isa_is_unset():
  result = run_python(
    "import jax_fmha; print(jax_fmha.build_info()['cpu_isa'])", JAX_FMHA_CPU_ISA=""
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == jax_fmha.build_info()["cpu_isa"]


@pytest.mark.skipif(
  shutil.which("cmake") is None or not os.path.exists(os.path.join(_ROOT, "CMakeLists.txt")),
  reason="needs cmake and the source tree",
)
@pytest.mark.parametrize("value, configures", [("bogus", False), ("No", True), ("0", True)])
def test_cmake_jax_fmha_cuda_values(value, configures, tmp_path):
  """JAX_FMHA_CUDA takes AUTO and CMake booleans, case-insensitive; anything else is a
  configure error naming it. (Only false values are configured here: true ones look for nvcc.)"""
  result = subprocess.run(
    ["cmake", "-S", _ROOT, "-B", str(tmp_path), f"-DJAX_FMHA_CUDA={value}"]
    + [f"-DPython_EXECUTABLE={sys.executable}"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  if configures:
    assert result.returncode == 0, result.stderr
    assert "jax_fmha CUDA backend: OFF" in result.stdout
  else:
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "JAX_FMHA_CUDA='bogus'" in message and "expected AUTO" in message
