"""The user-facing programs: examples/llama_decode.py at a small size (jax_fmha's Llama and
the plain-Flax one, with the same parameters, decode the same greedy tokens: float32, the
example asserts it), examples/tensor_parallel_decode.py on 2 and 4 virtual CPU devices (the
model split over them decodes the tokens it decodes on one device), and the command-line
help of the examples and of the ``python -m jax_fmha`` demo."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "llama_decode.py")
TENSOR_PARALLEL_EXAMPLE = os.path.join(ROOT, "examples", "tensor_parallel_decode.py")


@pytest.fixture(scope="module")
def llama_decode():
  spec = importlib.util.spec_from_file_location("llama_decode", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses resolve their annotations there
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


def test_example_decodes_like_flax(llama_decode, on_cpu):  # float32: on the CPU backend
  config = llama_decode.Config(
    vocab_size=128,
    features=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_features=96,
    dtype=jnp.float32,
  )
  fused, flax = llama_decode.run(config, prompt_lengths=[3, 9, 5], steps=8, page_size=4)
  assert fused.tokens.shape == flax.tokens.shape == (3, 8)
  assert fused.decode_tokens_per_second > 0 and flax.decode_tokens_per_second > 0


def test_example_decodes_with_an_fp8_cache(llama_decode, on_cpu):
  config = llama_decode.Config(
    vocab_size=128, features=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_features=96
  )
  fused, flax = llama_decode.run(
    config, prompt_lengths=[3, 9, 5], steps=6, page_size=4, cache_dtype=jnp.float8_e4m3fn
  )
  assert fused.tokens.shape == flax.tokens.shape == (3, 6)
  assert fused.decode_tokens_per_second > 0


@pytest.mark.parametrize("devices", [2, 4])
def test_tensor_parallel_example_decodes_like_one_device(devices):
  """The model split over `devices` virtual CPU devices chooses the tokens it chooses on one
  device (float32: the example asserts identical tokens)."""
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),  # the source tree
  )
  options = ["--layers", "2", "--steps", "6", "--prompt-lengths", "3", "9", "5"]
  result = subprocess.run(
    [sys.executable, TENSOR_PARALLEL_EXAMPLE, *options, "--dtype", "float32"],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"{devices} x cpu" in result.stdout.lower()
  assert f"heads split over {devices} devices" in result.stdout
  assert "check: identical tokens" in result.stdout


def run_demo(*args: str) -> subprocess.CompletedProcess:
  """``python -m jax_fmha`` of the source tree (run from the repository root)."""
  return subprocess.run(
    [sys.executable, "-m", "jax_fmha", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )


def test_demo_help_documents_every_option():
  result = run_demo("--help")
  assert result.returncode == 0, result.stderr
  for option, default in [("--batch", 2), ("--seq", 1024), ("--reps", 5), ("--steps", 16)]:
    assert f"{option} N" in result.stdout
    assert f"(default: {default}" in result.stdout
  assert "example: python -m jax_fmha --" in result.stdout
  assert "``" not in result.stdout and ":func:" not in result.stdout  # plain text, no reST


@pytest.mark.parametrize(
  "example", [EXAMPLE, TENSOR_PARALLEL_EXAMPLE], ids=["llama_decode", "tensor_parallel_decode"]
)
def test_example_help_documents_every_option(example):
  result = subprocess.run(
    [sys.executable, example, "--help"], capture_output=True, text=True, check=True
  )
  options = ["--prompt-lengths", "--steps", "--layers", "--page-size", "--dtype"]
  if example == EXAMPLE:
    options.append("--cache-dtype")
  for option in options:
    assert option in result.stdout
  assert result.stdout.count("(default: ") == len(options)


@pytest.mark.parametrize(("option", "value", "minimum"), [("--seq", "0", 1), ("--steps", "1", 2)])
def test_demo_refuses_bad_values_by_name(option, value, minimum):
  result = run_demo(option, value)
  assert result.returncode == 2  # argparse's usage error, before any computation
  assert f"argument {option}: expected an integer >= {minimum}, got '{value}'" in result.stderr
