"""jax.export: a function of jax_fmha kernels exported, serialized, and called in a fresh
process that imports jax_fmha (which registers the handlers) and deserializes it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fmha

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model(q, k, v, x):
  out = jax_fmha.attention(q, k, v, causal=True)
  return out, jax_fmha.swiglu(jax_fmha.rms_norm(x, jnp.ones(x.shape[-1], x.dtype)))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    cwd=_ROOT,
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=300,
  )


def gpu_available() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


@pytest.mark.parametrize(
  "platform",
  [
    "cpu",
    pytest.param(
      "cuda",
      marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not gpu_available(), reason="needs a CUDA device"),
      ],
    ),
  ],
)
def test_export_deserialize_in_fresh_process(platform, tmp_path, rng):
  pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
  dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
  q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 4, 64)), dtype) for _ in range(3))
  x = jnp.asarray(rng.standard_normal((8, 256)), dtype)
  device = jax.devices("cpu" if platform == "cpu" else "gpu")[0]
  args = jax.device_put((q, k, v, x), device)
  exported = jax.export.export(
    jax.jit(model),
    platforms=[platform],
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in jax_fmha.FFI_TARGETS],
  )(*args)
  (tmp_path / "model.bin").write_bytes(exported.serialize())
  np.savez(tmp_path / "args.npz", *[np.asarray(a.astype(jnp.float32)) for a in args])
  expected = [np.asarray(o.astype(jnp.float32)) for o in jax.jit(model)(*args)]

  result = run_python(
    f"""
    import jax, jax.numpy as jnp, numpy as np
    import jax_fmha  # registers the handlers

    exported = jax.export.deserialize(open({str(tmp_path / "model.bin")!r}, "rb").read())
    args = np.load({str(tmp_path / "args.npz")!r})
    args = [jnp.asarray(args[f"arr_{{i}}"], jnp.dtype({np.dtype(dtype).name!r})) for i in range(4)]
    args = jax.device_put(args, jax.devices({device.platform!r})[0])
    outs = exported.call(*args)
    np.savez({str(tmp_path / "outs.npz")!r}, *[np.asarray(o.astype(jnp.float32)) for o in outs])
    """
  )
  assert result.returncode == 0, result.stderr
  outs = np.load(tmp_path / "outs.npz")
  for i, want in enumerate(expected):
    np.testing.assert_array_equal(outs[f"arr_{i}"], want)


def test_ffi_targets_cover_the_exported_custom_calls(rng):
  """Every custom call jax_fmha emits is in FFI_TARGETS, and only jax_fmha's targets are."""
  q = jnp.asarray(rng.standard_normal((1, 8, 2, 32)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
  exported = jax.export.export(
    jax.jit(model),
    platforms=["cpu"],
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in jax_fmha.FFI_TARGETS],
  )(q, q, q, x)
  text = exported.mlir_module()
  used = {t for t in jax_fmha.FFI_TARGETS if f"@{t}(" in text or f'"{t}"' in text}
  assert {"jax_fmha_attention_fwd", "jax_fmha_glu", "jax_fmha_rms_norm"} <= used
  assert all(t.startswith("jax_fmha_") for t in jax_fmha.FFI_TARGETS)
  assert isinstance(jax_fmha.FFI_TARGETS, tuple)


def test_export_without_disabled_checks_names_the_target(rng):
  """jax.export refuses custom calls it does not know; the error names the target to allow."""
  q = jnp.asarray(rng.standard_normal((1, 8, 2, 32)), jnp.float32)
  f = jax.jit(lambda q: jax_fmha.attention(q, q, q))
  with pytest.raises(ValueError, match="jax_fmha_attention_fwd"):
    jax.export.export(f, platforms=["cpu"])(q)


def test_import_without_extension_runs_reference():
  """Without the compiled extension jax_fmha imports, FFI_TARGETS is empty, and
  backend='reference' runs."""
  result = run_python(
    """
    import sys
    sys.modules["jax_fmha._jax_fmha_ext"] = None  # the import fails as without a build
    import jax.numpy as jnp
    import jax_fmha

    assert jax_fmha.FFI_TARGETS == (), jax_fmha.FFI_TARGETS
    q = jnp.ones((1, 4, 2, 8))
    assert jax_fmha.attention(q, q, q, backend="reference").shape == q.shape
    """
  )
  assert result.returncode == 0, result.stderr
