"""The kernels inside sharded programs: shard_map over the batch, and jit on sharded inputs.

Runs in a subprocess with two virtual CPU devices (the device count is fixed when JAX
starts, so it cannot be changed inside this pytest process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jax_fmha

    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 33, 8, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, 57, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((4, 57, 2, 64)), jnp.float32)
    expected = jax_fmha.attention(q, k, v, causal=True, backend="reference")

    # shard_map: each device runs the kernel on its half of the batch.
    sharded = jax.jit(jax.shard_map(
        lambda q, k, v: jax_fmha.attention(q, k, v, causal=True), mesh=mesh,
        in_specs=(P("data"),) * 3, out_specs=P("data")))
    out = sharded(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=2e-5)
    assert "jax_fmha_attention_fwd" in sharded.lower(q, k, v).as_text()

    # jit on batch-sharded inputs: correct whatever the partitioner does with the call.
    spec = NamedSharding(mesh, P("data"))
    qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
    out = jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, causal=True))(qs, ks, vs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=2e-5)

    # Paged decode under shard_map: each device owns its sequences' pages.
    pages = jnp.asarray(rng.standard_normal((2, 12, 16, 2, 64)), jnp.float32)
    table = jnp.asarray(np.stack([rng.permutation(12)[:6].reshape(2, 3)] * 2), jnp.int32)
    lens = jnp.asarray([[40, 3], [17, 48]], jnp.int32)
    qd = jnp.asarray(rng.standard_normal((2, 2, 1, 8, 64)), jnp.float32)
    decode = lambda q, p, t, n: jax_fmha.attention(q[0], p[0], p[0], block_table=t[0],
                                                   seq_lens=n[0])[None]
    out = jax.jit(jax.shard_map(decode, mesh=mesh, in_specs=(P("data"),) * 4,
                                out_specs=P("data")))(qd, pages, table, lens)
    for d in range(2):
      ref = jax_fmha.attention(qd[d], pages[d], pages[d], block_table=table[d],
                               seq_lens=lens[d], backend="reference")
      np.testing.assert_allclose(np.asarray(out[d]), np.asarray(ref), rtol=1e-5, atol=2e-5)
    print("sharding ok")
""")


def test_kernels_in_sharded_programs():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  # Run from the tests folder so the installed package (with its extension) is imported.
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(__file__),
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "sharding ok" in result.stdout
