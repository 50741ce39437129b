"""The user-facing programs: examples/llama_decode.py at a small size (jax_fmha's Llama and
the plain-Flax one, with the same parameters, decode the same greedy tokens: float32, the
example asserts it), and the command-line help of the ``python -m jax_fmha`` demo."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

EXAMPLE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "llama_decode.py"
)


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


def run_demo(*args: str) -> subprocess.CompletedProcess:
  """``python -m jax_fmha`` of the source tree (run from the repository root)."""
  return subprocess.run(
    [sys.executable, "-m", "jax_fmha", *args],
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(EXAMPLE)),
  )


def test_demo_help_documents_every_option():
  result = run_demo("--help")
  assert result.returncode == 0, result.stderr
  for option, default in [("--batch", 2), ("--seq", 1024), ("--reps", 5), ("--steps", 16)]:
    assert f"{option} N" in result.stdout
    assert f"(default: {default}" in result.stdout
  assert "example: python -m jax_fmha --" in result.stdout
  assert "``" not in result.stdout and ":func:" not in result.stdout  # plain text, no reST


def test_example_help_documents_every_option():
  result = subprocess.run(
    [sys.executable, EXAMPLE, "--help"], capture_output=True, text=True, check=True
  )
  for option in ("--prompt-lengths", "--steps", "--layers", "--page-size", "--dtype"):
    assert option in result.stdout
  assert result.stdout.count("(default: ") == 5


@pytest.mark.parametrize(("option", "value", "minimum"), [("--seq", "0", 1), ("--steps", "1", 2)])
def test_demo_refuses_bad_values_by_name(option, value, minimum):
  result = run_demo(option, value)
  assert result.returncode == 2  # argparse's usage error, before any computation
  assert f"argument {option}: expected an integer >= {minimum}, got '{value}'" in result.stderr
