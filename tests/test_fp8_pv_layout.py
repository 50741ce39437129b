"""The Hopper kernel's FP8 P V data path, checked on the host: tests/cuda/hopper_fp8_pv_layout.cu
runs the producer's V transpose and the consumers' P packing (ffi/cuda/sm90/fp8_pv_layout.cuh,
the index maps the kernel runs) against CuTe's layouts of the P V product, at d64, d128 and
d256 (docs/design/fp8_attention.md, "FP8 P·V on Hopper"). Needs nvcc with sm_90a and the
nvidia-cutlass package's headers, and the sources beside the tests; skipped otherwise. No GPU."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "tests", "cuda", "hopper_fp8_pv_layout.cu")


def _cutlass_include():
  try:
    import cutlass_library
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
  return path if os.path.exists(os.path.join(path, "cute", "tensor.hpp")) else None


def test_fp8_pv_layout(tmp_path):
  nvcc = shutil.which("nvcc")
  cutlass = _cutlass_include()
  if nvcc is None or cutlass is None or not os.path.exists(PROGRAM):
    pytest.skip("needs nvcc, the nvidia-cutlass headers and the sources")
  binary = str(tmp_path / "hopper_fp8_pv_layout")
  compile_ = subprocess.run(
    [
      nvcc,
      "-std=c++17",
      "-arch=sm_90a",
      "-w",
      "-I",
      os.path.join(ROOT, "ffi"),
      "-isystem",
      cutlass,
      PROGRAM,
      "-o",
      binary,
    ],
    capture_output=True,
    text=True,
  )
  if compile_.returncode != 0 and "sm_90a" in compile_.stderr:
    pytest.skip(f"this nvcc does not target sm_90a: {compile_.stderr[-300:]}")
  assert compile_.returncode == 0, compile_.stderr[-3000:]
  run = subprocess.run([binary], capture_output=True, text=True)
  print(run.stdout)
  assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-3000:]
