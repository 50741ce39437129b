"""Describes the Python environment that jax_fmha's Bazel build compiles against.

Run by the jax_fmha_configure repository rule (configure.bzl) with the configured
interpreter, and the path of pyproject.toml; prints JSON: the directories to link into the
generated repository (the interpreter's headers, nanobind's headers and sources, the XLA FFI
headers of jaxlib, and the CuTe/CUTLASS headers and CUDA toolkit where found), and the
values the build needs (the versions build_info() reports, the extension file suffix, the
CUDA architectures). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import jax
import jaxlib.version
import nanobind


def cuda_toolkit() -> tuple[str, list[str]]:
  """nvcc (CUDACXX, else on PATH, as CMake finds it) and the library directories it links
  from; ("", []) without a working one."""
  nvcc = shutil.which(os.environ.get("CUDACXX") or "nvcc")
  if nvcc is None:
    return "", []
  # nvcc's dry run prints its LIBRARIES line: the toolkit's lib directory and the stubs.
  dry_run = subprocess.run(
    [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
    capture_output=True,
    text=True,
  )
  library_dirs = [
    os.path.realpath(word.strip('"')[2:])
    for line in dry_run.stderr.splitlines()
    if line.startswith("#$ LIBRARIES=")
    for word in line.split("=", 1)[1].split()
    if word.strip('"').startswith("-L") and not word.strip('"').endswith("/stubs")
  ]
  return (nvcc, library_dirs) if dry_run.returncode == 0 and library_dirs else ("", [])


def cutlass_include_dir() -> str:
  """The CuTe/CUTLASS headers of the nvidia-cutlass package; "" without it."""
  try:
    import cutlass_library  # only CUDA builds need it
  except ImportError:
    return ""
  return os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")


def main(pyproject_path: str) -> None:
  with open(pyproject_path, "rb") as file:
    pyproject = tomllib.load(file)
  # The same knob and default as pip's build.
  pip_defines = pyproject["tool"]["scikit-build"]["cmake"]["define"]
  architectures = (
    os.environ.get("JAX_FMHA_CUDA_ARCHITECTURES")
    or pip_defines["JAX_FMHA_CUDA_ARCHITECTURES"]["default"]
  )
  nvcc, cuda_library_dirs = cuda_toolkit()
  cutlass = cutlass_include_dir()
  directories = {
    "python_include": sysconfig.get_paths()["include"],
    "xla_ffi_include": jax.ffi.include_dir(),
    "nanobind_include": nanobind.include_dir(),
    "nanobind_src": nanobind.source_dir(),
    # nanobind's bundled hash map, where its own CMake build finds it.
    "robin_map_include": os.path.join(
      os.path.dirname(nanobind.source_dir()), "ext", "robin_map", "include"
    ),
  }
  if cutlass:
    directories["cutlass_include"] = cutlass
  missing_for_cuda = [
    what
    for what, found in (
      ("nvcc (set CUDACXX or put it on PATH)", nvcc),
      ("the nvidia-cutlass package (pip install nvidia-cutlass)", cutlass),
    )
    if not found
  ]
  json.dump(
    {
      "python": sys.executable,
      "directories": directories,
      "values": {
        "JAX_FMHA_VERSION": pyproject["project"]["version"],
        "JAXLIB_VERSION": jaxlib.version.__version__,
        "PYTHON_EXTENSION_SUFFIX": sysconfig.get_config_var("EXT_SUFFIX"),
        "CUDA_ARCHITECTURES": architectures.split(";"),
        "NVCC": nvcc,
        "CUDA_LIBRARY_DIRS": cuda_library_dirs,
        "CUDA_MISSING": ", ".join(missing_for_cuda),
      },
    },
    sys.stdout,
  )


if __name__ == "__main__":
  main(sys.argv[1])
