"""The Bazel build compiles the extension as CMakeLists.txt (pip's build) does: the same
sources, flags, CPU kernel variants and CUDA kernel instantiations. Bazel's copy of them is
bazel/extension.bzl, plain literals read here; a change to one build only fails here."""

from __future__ import annotations

import ast
import os
import re

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*path: str) -> str:
  with open(os.path.join(_ROOT, *path)) as file:
    return file.read()


@pytest.fixture(scope="module")
def cmake() -> str:
  return read("CMakeLists.txt")


@pytest.fixture(scope="module")
def bazel() -> dict:
  module = ast.parse(read("bazel", "extension.bzl"))
  return {
    target.id: ast.literal_eval(node.value)
    for node in module.body
    if isinstance(node, ast.Assign)
    for target in node.targets
  }


def cmake_words(cmake: str, pattern: str) -> list[str]:
  """The whitespace-separated words of the one group of `pattern` in CMakeLists.txt."""
  matches = re.findall(pattern, cmake, re.DOTALL)
  assert len(matches) == 1, f"{pattern!r} matches {len(matches)} times in CMakeLists.txt"
  return matches[0].split()


def test_extension_sources_and_flags(cmake, bazel):
  assert bazel["EXTENSION_SRCS"] == cmake_words(
    cmake, r"nanobind_add_module\(_jax_fmha_ext NB_STATIC([^)]*)\)"
  )
  assert bazel["EXTENSION_COPTS"] == cmake_words(
    cmake, r"target_compile_options\(_jax_fmha_ext PRIVATE\s+\$<\$<COMPILE_LANGUAGE:CXX>:([^>]*)>"
  )


def test_attention_kernel_variants(cmake, bazel):
  assert [bazel["ATTENTION_KERNEL_SRC"]] == cmake_words(
    cmake, r"add_library\(\$\{lib\} OBJECT([^)]*)\)"
  )
  assert bazel["ATTENTION_KERNEL_COPTS"] == cmake_words(
    cmake, r"target_compile_options\(\$\{lib\} PRIVATE([^$]*)\$\{ARGN\}\)"
  )
  calls = re.findall(r"^\s*jax_fmha_attention_kernel\((\w+)([^)]*)\)", cmake, re.MULTILINE)
  assert bazel["ATTENTION_KERNEL_ISAS"] == {isa: flags.split() for isa, flags in calls}
  # BUILD.bazel builds every variant but the baseline on x86-64 only, as CMake does.
  x86_64_only = cmake_words(
    cmake, r'if\(CMAKE_SYSTEM_PROCESSOR MATCHES "[^"]*x86_64[^"]*"\)(.*?)endif\(\)'
  )
  assert [word for word in x86_64_only if word.startswith("jax_fmha_attention_kernel(")] == [
    f"jax_fmha_attention_kernel({isa}"
    for isa in bazel["ATTENTION_KERNEL_ISAS"]
    if isa != "baseline"
  ]


def test_cuda_sources_and_instances(cmake, bazel):
  assert bazel["CUDA_SRCS"] == cmake_words(
    cmake, r"target_sources\(_jax_fmha_ext PRIVATE (ffi/cuda/[^)]*)\)"
  )
  assert bazel["CUDA_COPTS"] == cmake_words(cmake, r"\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>")
  assert [bazel["FORWARD_INSTANCE_TEMPLATE"]] == cmake_words(
    cmake, r"configure_file\((\S+) \"\$\{_instance\}\""
  )
  assert bazel["FORWARD_HEAD_DIMS"] == [
    int(dim) for dim in cmake_words(cmake, r"set\(_fmha_head_dims([^)]*)\)")
  ]
  kernels = [
    entry.strip('"').split(":") for entry in cmake_words(cmake, r"set\(_fmha_kernels([^)]*)\)")
  ]
  assert bazel["FORWARD_KERNELS"] == {name: [kernel, header] for kernel, header, name in kernels}


def test_fp8_cuda_instances(cmake, bazel):
  assert [bazel["FP8_FORWARD_INSTANCE_TEMPLATE"]] == cmake_words(
    cmake, r"configure_file\((\S+) \"\$\{_fp8_instance\}\""
  )
  assert bazel["FP8_FORWARD_HEAD_DIMS"] == [
    int(dim) for dim in cmake_words(cmake, r"set\(_fmha_fp8_head_dims([^)]*)\)")
  ]
  kernels = [
    entry.strip('"').split(":") for entry in cmake_words(cmake, r"set\(_fmha_fp8_kernels([^)]*)\)")
  ]
  assert bazel["FP8_FORWARD_KERNELS"] == {
    name: [kernel, header] for kernel, header, name in kernels
  }


def test_fp8_query_cuda_instances(cmake, bazel):
  assert [bazel["FP8Q_FORWARD_INSTANCE_TEMPLATE"]] == cmake_words(
    cmake, r"configure_file\((\S+) \"\$\{_fp8q_instance\}\""
  )
  kernels = [
    entry.strip('"').split(":") for entry in cmake_words(cmake, r"set\(_fmha_fp8q_kernels([^)]*)\)")
  ]
  assert bazel["FP8Q_FORWARD_KERNELS"] == {
    name: [kernel, header] for kernel, header, name in kernels
  }
