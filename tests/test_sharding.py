"""Sharded programs: each kernel splits over a device mesh as its partitioning rule says.

Each case runs in a subprocess with virtual CPU devices (the device count is fixed when JAX
starts): ``python tests/test_sharding.py CASE``, with XLA_FLAGS set by the test. A case
jits a function on sharded inputs and checks the compiled program: no collective
(all-gather, all-to-all, ...) moves an operand, each kernel custom call runs on its shard's
shapes, the outputs are sharded as expected, and the numbers equal the unsharded run's.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_fmha

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(case, devices: int | None) -> None:
  """Runs `case` (a function of this module) in a process with `devices` CPU devices (None:
  the machine's GPUs), importing the source tree's jax_fmha (the installed extension is
  found from it)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")]))
  if devices is not None:
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, __file__, case.__name__],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=_ROOT,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"{case.__name__} ok" in result.stdout


# ---------------------------------------------------------------------------------------
# Checks, run in the subprocess
# ---------------------------------------------------------------------------------------

GATHER = re.compile(r"= \w+\[([\d,]+)\]\S* all-gather\(")  # an all-gather's result shape
COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)\b")


def kernel_result_shapes(hlo: str) -> list[tuple[int, ...]]:
  """The result shapes of every jax_fmha custom call in compiled HLO text, sorted."""
  shapes = []
  for line in hlo.splitlines():
    if 'custom_call_target="jax_fmha_' in line:
      results = line.split(" = ", 1)[1].split(" custom-call(", 1)[0]
      for dims in re.findall(r"\w+\[([\d,]*)\]", results):
        shapes.append(tuple(int(n) for n in dims.split(",") if n))
  return sorted(shapes)


def full_spec(spec, ndim: int) -> tuple:
  return tuple(spec) + (None,) * (ndim - len(spec))


def check_split(name, fn, args, in_specs, mesh, out_specs, kernel_shapes, donate=()):
  """jit `fn` on `args` placed as `in_specs` on `mesh`: no collective in the compiled
  program, the kernels' results of `kernel_shapes` (per device), outputs sharded as
  `out_specs` and equal to the unsharded run. Returns the placed args and the HLO text."""
  expected = jax.jit(fn)(*args)  # one device
  placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs)]
  compiled = jax.jit(fn, donate_argnums=donate).lower(*placed).compile()
  hlo = compiled.as_text()
  found = COLLECTIVE.search(hlo)
  assert not found, f"{name}: {found.group(0)} in the compiled program"
  assert kernel_result_shapes(hlo) == sorted(kernel_shapes), (name, kernel_result_shapes(hlo))
  outs = jax.tree.leaves(compiled(*placed))
  assert len(outs) == len(out_specs), name
  for i, (out, want, spec) in enumerate(zip(outs, jax.tree.leaves(expected), out_specs)):
    got = full_spec(out.sharding.spec, out.ndim)
    assert got == full_spec(spec, out.ndim), f"{name}: output {i} sharded as {got}, not {spec}"
    assert_shards_equal(out, want, f"{name}: output {i}")
  return placed, hlo


def assert_shards_equal(out, want, what: str):
  """Every device's shard of `out` (each copy of a replicated one too) equals `want`'s."""
  want = np.asarray(want, np.float32)  # (exact for every dtype the kernels take)
  for shard in out.addressable_shards:
    np.testing.assert_allclose(
      np.asarray(shard.data, np.float32), want[shard.index], rtol=1e-6, atol=1e-6, err_msg=what
    )


def check_in_place(name, placed, hlo, local_cache_shape):
  """The donated caches (arguments 0 and 1) are updated in place: aliased to outputs 0
  and 1, deleted, and never copied."""
  header = hlo.splitlines()[0]
  assert "input_output_alias={ {0}: (0, {}, may-alias), {1}: (1, {}, may-alias) }" in header, (
    name,
    header,
  )
  assert placed[0].is_deleted() and placed[1].is_deleted(), name
  dims = ",".join(map(str, local_cache_shape))
  copies = [line for line in hlo.splitlines() if re.search(rf"\[{dims}\]\S* copy\(", line)]
  assert not copies, (name, copies)


def rng_and_randn(seed):
  """A NumPy Generator, and a function of a shape giving float32 standard-normal values."""
  rng = np.random.default_rng(seed)
  return rng, lambda *shape: np.asarray(rng.standard_normal(shape), np.float32)


def auto_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def paged_pool(rng, randn, batch, pages_per_seq, page_size, kv_heads, head_dim):
  """A page pool with every sequence's pages scattered by a permuted block table."""
  num_pages = batch * pages_per_seq + 2
  pool = (
    randn(num_pages, page_size, kv_heads, head_dim),
    randn(num_pages, page_size, kv_heads, head_dim),
  )
  table = rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, -1)
  return pool, table.astype(np.int32)


def attend_causal(q, k, v):
  return jax_fmha.attention(q, k, v, causal=True, num_splits=1, return_lse=True)


def check_batch_and_head_splits(q, k, v, line):
  """Dense causal attention with its LSE split over the batch, then over the heads, on the
  1-D mesh `line` (axis "x")."""
  n, (b, s, hq, d) = line.size, q.shape
  heads = P(None, None, "x")
  check_split(
    "batch",
    attend_causal,
    (q, k, v),
    [P("x")] * 3,
    line,
    [P("x")] * 2,
    [(b // n, s, hq, d), (b // n, hq, s)],
  )
  check_split(
    "heads",
    attend_causal,
    (q, k, v),
    [heads] * 3,
    line,
    [heads, P(None, "x")],
    [(b, s, hq // n, d), (b, hq // n, s)],
  )


# ---------------------------------------------------------------------------------------
# Cases (each runs in its own process)
# ---------------------------------------------------------------------------------------


def attention_splits():
  """Dense, split-KV, packed, paged and contiguous-cache attention over batch, heads and
  both, on 4 devices; GQA with more head shards than KV heads runs whole (correctly)."""
  rng, randn = rng_and_randn(1)
  mesh, line = auto_mesh((2, 2), ("data", "model")), auto_mesh((4,), ("x",))
  both, heads = P("data", None, "model"), P(None, None, "x")
  q, k, v = randn(4, 33, 8, 64), randn(4, 57, 4, 64), randn(4, 57, 4, 64)
  check_batch_and_head_splits(q, k, v, line)
  check_split(
    "batch x heads",
    attend_causal,
    (q, k, v),
    [both] * 3,
    mesh,
    [both, P("data", "model")],
    [(2, 33, 4, 64), (2, 4, 33)],
  )
  # Split-KV: the partial results and their merge run on the shard.
  check_split(
    "split-KV",
    lambda q, k, v: jax_fmha.attention(q, k, v, causal=True, num_splits=3),
    (q, k, v),
    [both] * 3,
    mesh,
    [both],
    [(3, 2, 33, 4, 64), (3, 2, 4, 33), (2, 33, 4, 64), (2, 33, 4)],
  )

  cu_q, cu_k = np.array([0, 5, 20, 33], np.int32), np.array([0, 30, 31, 57], np.int32)
  packed_heads = P(None, "x")
  check_split(
    "packed",
    lambda q, k, v, cq, ck: jax_fmha.attention(
      q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, num_splits=1, return_lse=True
    ),
    (q[0], k[0], v[0], cu_q, cu_k),
    [packed_heads] * 3 + [P(), P()],
    line,
    [packed_heads, P("x")],
    [(33, 2, 64), (2, 33)],
  )

  (k_pages, v_pages), table = paged_pool(rng, randn, 4, 3, 16, 4, 64)
  lens = np.array([40, 3, 17, 48], np.int32)
  q_decode = randn(4, 2, 8, 64)

  def paged(q, k_pages, v_pages, table, lens):
    return jax_fmha.attention(
      q, k_pages, v_pages, block_table=table, seq_lens=lens, causal=True, num_splits=1
    )

  # The pool splits on KV heads; the batch (block table, lengths) on another mesh axis.
  pool = P(None, None, "model")
  check_split(
    "paged, batch x heads",
    paged,
    (q_decode, k_pages, v_pages, table, lens),
    [both, pool, pool, P("data"), P("data")],
    mesh,
    [both],
    [(2, 2, 4, 64), (2, 4, 2)],
  )
  check_split(
    "paged, heads",
    paged,
    (q_decode, k_pages, v_pages, table, lens),
    [heads, heads, heads, P(), P()],
    line,
    [heads],
    [(4, 2, 2, 64), (4, 2, 2)],
  )
  k_cache, v_cache = randn(4, 50, 4, 64), randn(4, 50, 4, 64)
  check_split(
    "contiguous cache",
    lambda q, k, v, lens: jax_fmha.attention(q, k, v, seq_lens=lens, num_splits=1),
    (q_decode, k_cache, v_cache, lens),
    [both, both, both, P("data")],
    mesh,
    [both],
    [(2, 2, 4, 64), (2, 4, 2)],
  )

  # 4 shards of query heads but 2 KV heads: each kernel call needs its KV heads, so the
  # heads are gathered (a correct, unsplit call).
  q, k, v = randn(2, 9, 8, 32), randn(2, 11, 2, 32), randn(2, 11, 2, 32)
  f = jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, num_splits=1))
  out = f(jax.device_put(q, NamedSharding(line, heads)), k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(f(q, k, v)), rtol=1e-6, atol=1e-6)


def cache_updates_in_place():
  """update_kv_cache under donation, split over heads (paged) and batch x heads
  (contiguous): in place on each device, no collective."""
  rng, randn = rng_and_randn(2)
  mesh = auto_mesh((2, 2), ("data", "model"))
  both, pool = P("data", None, "model"), P(None, None, "model")
  (k_pages, v_pages), table = paged_pool(rng, randn, 4, 3, 16, 4, 64)
  k_new, v_new = randn(4, 2, 4, 64), randn(4, 2, 4, 64)
  lens = np.array([30, 3, 17, 46], np.int32)

  # Paged: the batch stays whole (every copy of the pool takes every write).
  placed, hlo = check_split(
    "paged update",
    lambda kc, vc, kn, vn, t, n: jax_fmha.update_kv_cache(kc, vc, kn, vn, t, n),
    (k_pages, v_pages, k_new, v_new, table, lens),
    [pool, pool, pool, pool, P(), P()],
    mesh,
    [pool, pool],
    [(14, 16, 2, 64)] * 2,
    donate=(0, 1),
  )
  check_in_place("paged update", placed, hlo, (14, 16, 2, 64))

  # New tokens split over the batch are gathered (they are small), never the pool: each
  # copy of the pool takes every sequence's writes, so the copies stay equal.
  placed = [
    jax.device_put(a, NamedSharding(mesh, spec))
    for a, spec in zip((k_pages, v_pages, k_new, v_new), [pool, pool, both, both])
  ]
  update = jax.jit(lambda kc, vc, kn, vn: jax_fmha.update_kv_cache(kc, vc, kn, vn, table, lens))
  hlo = update.lower(*placed).compile().as_text()
  gathered = [math.prod(map(int, dims.split(","))) for dims in re.findall(GATHER, hlo)]
  assert gathered and max(gathered) == k_new.size // 2, gathered  # its KV heads, all rows
  for out, want in zip(update(*placed), jax.jit(update)(k_pages, v_pages, k_new, v_new)):
    assert_shards_equal(out, want, "paged update of batch-split tokens")

  k_cache, v_cache = randn(4, 50, 4, 64), randn(4, 50, 4, 64)
  placed, hlo = check_split(
    "contiguous update",
    lambda kc, vc, kn, vn, n: jax_fmha.update_kv_cache(kc, vc, kn, vn, None, n),
    (k_cache, v_cache, k_new, v_new, lens),
    [both] * 4 + [P("data")],
    mesh,
    [both, both],
    [(2, 50, 2, 64)] * 2,
    donate=(0, 1),
  )
  check_in_place("contiguous update", placed, hlo, (2, 50, 2, 64))


def merge_and_mlp_split_rows():
  """merge_attention_states and the MLP ops split by rows; GLUs with separate or
  interleaved gate/up split the hidden axis too; a norm -> matmul -> swiglu -> matmul
  block keeps its batch split."""
  _, randn = rng_and_randn(3)
  mesh, line = auto_mesh((2, 2), ("data", "model")), auto_mesh((4,), ("x",))
  check_split(
    "merge",
    lambda outs, lses: jax_fmha.merge_attention_states(outs, lses),
    (randn(3, 4, 6, 8, 64), randn(3, 4, 8, 6)),
    [P(None, "data", None, "model"), P(None, "data", "model")],
    mesh,
    [P("data", None, "model"), P("data", "model")],
    [(2, 6, 4, 64), (2, 6, 4)],
  )
  x, residual, weight = randn(8, 6, 256), randn(8, 6, 256), randn(256)
  rows, hidden = P("data", "model"), P("data", None, "model")
  check_split("rms_norm", jax_fmha.rms_norm, (x, weight), [rows, P()], mesh, [rows], [(4, 3, 256)])
  check_split(
    "rms_norm_residual",
    jax_fmha.rms_norm_residual,
    (x, residual, weight),
    [rows, rows, P()],
    mesh,
    [rows, rows],
    [(4, 3, 256)] * 2,
  )
  check_split("swiglu", jax_fmha.swiglu, (x, residual), [hidden] * 2, mesh, [hidden], [(4, 6, 128)])
  check_split(
    "geglu, interleaved",
    lambda gate_up: jax_fmha.geglu(gate_up, packed_layout="interleaved"),
    (x,),
    [hidden],
    mesh,
    [hidden],
    [(4, 6, 64)],
  )
  check_split("swiglu, concat", jax_fmha.swiglu, (x,), [rows], mesh, [rows], [(4, 3, 128)])

  def block(x, weight, w_up, w_down):
    return jax_fmha.swiglu(jax_fmha.rms_norm(x, weight) @ w_up) @ w_down

  check_split(
    "mlp block",
    block,
    (x, weight, randn(256, 512), randn(256, 256)),
    [P("x"), P(), P(), P()],
    line,
    [P("x")],
    [(2, 6, 256), (2, 6, 256)],
  )


def explicit_mesh():
  """Explicitly sharded types: outputs typed as the kernel splits, no collective; a
  sharding the kernel cannot take raises a ValueError naming the operand and axis."""
  rng, randn = rng_and_randn(4)
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  both = P("data", None, "model")
  q, k, v = randn(4, 32, 8, 64), randn(4, 57, 4, 64), randn(4, 57, 4, 64)
  (k_pages, v_pages), table = paged_pool(rng, randn, 4, 3, 16, 4, 64)
  lens = np.array([40, 3, 17, 48], np.int32)
  x, weight = randn(8, 6, 256), randn(256)
  attend = attend_causal

  def paged(q, k_pages, v_pages):  # NumPy block table and lengths: replicated
    return jax_fmha.attention(q, k_pages, v_pages, block_table=table, seq_lens=lens)

  def block(x, weight, w_up, w_down):
    return jax_fmha.swiglu(jax_fmha.rms_norm(x, weight) @ w_up) @ w_down

  expected = jax.jit(attend)(q, k, v), jax.jit(paged)(q[:, :1], k_pages, v_pages)
  with jax.set_mesh(mesh):
    qs, ks, vs = (jax.device_put(a, both) for a in (q, k, v))
    out, lse = jax.jit(attend)(qs, ks, vs)
    assert jax.typeof(out).sharding.spec == P("data", None, "model", None), jax.typeof(out)
    assert jax.typeof(lse).sharding.spec == P("data", "model", None), jax.typeof(lse)
    hlo = jax.jit(attend).lower(qs, ks, vs).compile().as_text()
    assert not COLLECTIVE.search(hlo) and kernel_result_shapes(hlo) == [(2, 4, 32), (2, 32, 4, 64)]
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected[0][0]), rtol=1e-6, atol=1e-6)

    # An unsharded operand is fine: its shard is a local slice.
    out = jax.jit(attend)(qs, k, v)[0]
    assert jax.typeof(out).sharding.spec == P("data", None, "model", None)

    pool = P(None, None, "model")
    args = (
      jax.device_put(q[:, :1], both),
      jax.device_put(k_pages, pool),
      jax.device_put(v_pages, pool),
    )
    out = jax.jit(paged)(*args)
    assert jax.typeof(out).sharding.spec == P("data", None, "model", None)
    hlo = jax.jit(paged).lower(*args).compile().as_text()
    assert not COLLECTIVE.search(hlo) and kernel_result_shapes(hlo) == [(2, 1, 4, 64), (2, 4, 1)]
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected[1]), rtol=1e-6, atol=1e-6)

    out = jax.jit(block)(jax.device_put(x, P("data")), weight, randn(256, 512), randn(256, 256))
    assert jax.typeof(out).sharding.spec == P("data", None, None)

    for fn, args, message in [
      (
        attend,
        (jax.device_put(q, P(None, "data")), ks, vs),
        "attention: q is sharded as P(None, 'data', None, None), but axis 1 (seq_q) cannot "
        "be split over ('data',): each kernel call needs it whole (q splits on axes 0 (batch), "
        "2 (kv_heads group) only)",
      ),
      (
        attend,
        (qs, jax.device_put(k, P("model")), vs),
        "attention: k is sharded as P('model', None, None, None), but axis 0 (batch) cannot "
        "be split over ('model',): q splits batch over ('data',). Expected k sharded as "
        "P('data', None, 'model', None)",
      ),
      (
        jax_fmha.rms_norm,
        (jax.device_put(x, P(None, None, "model")), weight),
        "rms_norm: x is sharded as P(None, None, 'model'), but axis 2 (hidden) cannot be "
        "split over ('model',): each kernel call needs it whole (x splits on axes 0 (rows0), "
        "1 (rows1) only)",
      ),
    ]:
      try:
        jax.jit(fn)(*args)
      except ValueError as e:
        assert message in str(e), str(e)
      else:
        raise AssertionError(f"no error for {message}")


def shard_map_varying_axes():
  """Under shard_map each output varies over its operands' manual axes (all of them): a
  program whose output differs per device cannot claim a replicated out_spec, as with the
  reference backend. Data parallel paged attention over per-device pools; and a shard_map
  program exports (jax.export) and runs on 4 devices."""
  rng, randn = rng_and_randn(5)
  line, mesh = auto_mesh((4,), ("x",)), auto_mesh((2, 2), ("data", "model"))
  q, k, v = randn(4, 9, 8, 32), randn(4, 56, 4, 32), randn(4, 56, 4, 32)
  keys = P(None, "x")  # each device attends over its quarter of the keys
  for backend in ("reference", "auto"):

    def attend(q, k, v, backend=backend):
      return jax_fmha.attention(q, k, v, backend=backend)

    try:
      jax.jit(jax.shard_map(attend, mesh=line, in_specs=(P(), keys, keys), out_specs=P()))(q, k, v)
    except ValueError as e:
      assert "out_specs" in str(e), str(e)
    else:
      raise AssertionError(f"{backend}: a varying attention output passed as replicated")
    out = jax.jit(jax.shard_map(attend, mesh=line, in_specs=(P(), keys, keys), out_specs=P("x")))(
      q, k, v
    )
    for i in range(4):  # device i's queries against its keys
      want = jax_fmha.attention(q, k[:, 14 * i : 14 * (i + 1)], v[:, 14 * i : 14 * (i + 1)])
      np.testing.assert_allclose(np.asarray(out[4 * i : 4 * (i + 1)]), want, rtol=1e-5, atol=2e-5)

    def update(cache, new, backend=backend):
      lens = jnp.zeros(4, jnp.int32)
      return jax_fmha.update_kv_cache(cache, cache, new, new, None, lens, backend=backend)[0]

    try:
      jax.jit(jax.shard_map(update, mesh=line, in_specs=(P(), keys), out_specs=P()))(k, k[:, :8])
    except ValueError as e:
      assert "out_specs" in str(e), str(e)
    else:
      raise AssertionError(f"{backend}: a varying cache passed as replicated")

  # Data parallel over paged caches: each device owns a pool, and its sequences' block
  # tables hold ids of that pool's pages.
  k_pools, v_pools = randn(4, 8, 16, 4, 32), randn(4, 8, 16, 4, 32)
  tables = np.stack([rng.permutation(8)[:6].reshape(2, 3) for _ in range(4)]).astype(np.int32)
  lens = np.array([[40, 3], [17, 48], [1, 0], [33, 2]], np.int32)
  q_decode = randn(4, 2, 1, 8, 32)

  def decode(q, k_pools, v_pools, tables, lens):
    out = jax_fmha.attention(q[0], k_pools[0], v_pools[0], block_table=tables[0], seq_lens=lens[0])
    return out[None]

  out = jax.jit(jax.shard_map(decode, mesh=line, in_specs=(P("x"),) * 5, out_specs=P("x")))(
    q_decode, k_pools, v_pools, tables, lens
  )
  for i in range(4):
    want = jax_fmha.attention(
      q_decode[i],
      k_pools[i],
      v_pools[i],
      block_table=tables[i],
      seq_lens=lens[i],
      backend="reference",
    )
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(want), rtol=1e-5, atol=2e-5)

  # Export: inside shard_map the kernels are plain custom calls on local shapes.
  both = P("data", None, "model")
  f = jax.jit(
    jax.shard_map(
      lambda q, k, v: jax_fmha.attention(q, k, v, causal=True),
      mesh=mesh,
      in_specs=(both,) * 3,
      out_specs=both,
    )
  )
  args = [jax.device_put(a, NamedSharding(mesh, both)) for a in (q, k, v)]
  allowed = [jax.export.DisabledSafetyCheck.custom_call(t) for t in jax_fmha.FFI_TARGETS]
  exported = jax.export.export(f, disabled_checks=allowed)(*args)
  out = jax.export.deserialize(exported.serialize()).call(*args)
  want = jax_fmha.attention(q, k, v, causal=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert full_spec(out.sharding.spec, 4) == full_spec(both, 4)


def gspmd_partitioner():
  """The same splits with JAX's GSPMD partitioner (its sharding callbacks), and a program
  without a mesh (GSPMD shardings), where the kernels run whole."""
  jax.config.update("jax_use_shardy_partitioner", False)
  _, randn = rng_and_randn(6)
  mesh, line = auto_mesh((2, 2), ("data", "model")), auto_mesh((4,), ("x",))
  both = P("data", None, "model")
  q, k, v = randn(4, 33, 8, 64), randn(4, 57, 4, 64), randn(4, 57, 4, 64)
  check_split(
    "attention",
    lambda q, k, v: jax_fmha.attention(q, k, v, causal=True, num_splits=1, return_lse=True),
    (q, k, v),
    [both] * 3,
    mesh,
    [both, P("data", "model")],
    [(2, 33, 4, 64), (2, 4, 33)],
  )
  x, weight = randn(8, 6, 256), randn(256)
  check_split(
    "mlp block",
    lambda x, w, w_up, w_down: jax_fmha.swiglu(jax_fmha.rms_norm(x, w) @ w_up) @ w_down,
    (x, weight, randn(256, 512), randn(256, 256)),
    [P("x"), P(), P(), P()],
    line,
    [P("x")],
    [(2, 6, 256), (2, 6, 256)],
  )
  k_cache, v_cache, k_new = randn(4, 50, 4, 64), randn(4, 50, 4, 64), randn(4, 2, 4, 64)
  placed, hlo = check_split(
    "contiguous update",
    lambda kc, vc, kn, n: jax_fmha.update_kv_cache(kc, vc, kn, kn, None, n),
    (k_cache, v_cache, k_new, np.array([30, 3, 17, 46], np.int32)),
    [both] * 3 + [P("data")],
    mesh,
    [both, both],
    [(2, 50, 2, 64)] * 2,
    donate=(0, 1),
  )
  check_in_place("contiguous update", placed, hlo, (2, 50, 2, 64))

  from jax._src.sharding_impls import GSPMDSharding  # no public way to drop the mesh

  for shardy in (False, True):
    jax.config.update("jax_use_shardy_partitioner", shardy)
    replicated = GSPMDSharding.get_replicated(jax.devices())
    f = jax.jit(jax_fmha.rms_norm, in_shardings=replicated, out_shardings=replicated)
    out = f(x, weight)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax_fmha.rms_norm(x, weight)))


def decode_step_on_8_devices():
  """A decode step (append to a contiguous cache, attend) on a 2 x 4 mesh, batch x KV
  heads, with the caches donated: in place, no collective."""
  _, randn = rng_and_randn(7)
  mesh = auto_mesh((2, 4), ("data", "model"))
  both = P("data", None, "model")
  q, k_new, v_new = randn(4, 1, 16, 64), randn(4, 1, 4, 64), randn(4, 1, 4, 64)
  k_cache, v_cache = randn(4, 40, 4, 64), randn(4, 40, 4, 64)

  def step(k_cache, v_cache, q, k_new, v_new, lens):
    out, k_cache, v_cache = jax_fmha.attention_with_kvcache(
      q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True, num_splits=1
    )
    return k_cache, v_cache, out

  placed, hlo = check_split(
    "decode step",
    step,
    (k_cache, v_cache, q, k_new, v_new, np.array([5, 0, 39, 20], np.int32)),
    [both] * 5 + [P("data")],
    mesh,
    [both] * 3,
    [(2, 40, 1, 64)] * 2 + [(2, 1, 4, 64), (2, 4, 1)],
    donate=(0, 1),
  )
  check_in_place("decode step", placed, hlo, (2, 40, 1, 64))


def fp8_cache_decode_step():
  """A decode step over FP8 caches (append, then attend) on a 2 x 2 mesh, batch x KV
  heads: the per-head scales split with the heads, per-sequence scales [B, Hkv] (FP8
  queries' too) with the batch and the heads; in place, no collective."""
  rng, randn = rng_and_randn(8)
  mesh = auto_mesh((2, 2), ("data", "model"))
  both = P("data", None, "model")
  q, k_new, v_new = randn(4, 1, 8, 64), randn(4, 1, 4, 64), randn(4, 1, 4, 64)
  q8, q_scale = jax_fmha.quantize_fp8(q, num_kv_heads=4)
  per_head, per_sequence = (
    [np.asarray(rng.uniform(0.5, 2, shape), np.float32) for _ in range(2)] for shape in (4, (4, 4))
  )
  cases = [  # name, queries, scales by name, the scales' shardings
    ("FP8 decode step", q, dict(zip(("k_scale", "v_scale"), per_head)), P("model")),
    (
      "FP8 queries, per-sequence scales",
      q8,
      dict(q_scale=q_scale, **dict(zip(("k_scale", "v_scale"), per_sequence))),
      P("data", "model"),
    ),
  ]
  for name, queries, scales, scale_spec in cases:

    def step(k_cache, v_cache, q, k_new, v_new, lens, *values, names=tuple(scales)):
      out, k_cache, v_cache = jax_fmha.attention_with_kvcache(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        cache_seqlens=lens,
        causal=True,
        num_splits=1,
        **dict(zip(names, values)),
      )
      return k_cache, v_cache, out

    k_cache, v_cache = (np.asarray(randn(4, 40, 4, 64), jnp.float8_e4m3fn) for _ in range(2))
    lens = np.array([5, 0, 39, 20], np.int32)
    placed, hlo = check_split(
      name,
      step,
      (k_cache, v_cache, queries, k_new, v_new, lens, *scales.values()),
      [both] * 5 + [P("data")] + [scale_spec] * len(scales),
      mesh,
      [both] * 3,
      [(2, 40, 2, 64)] * 2 + [(2, 1, 4, 64), (2, 4, 1)],
      donate=(0, 1),
    )
    check_in_place(name, placed, hlo, (2, 40, 2, 64))


def two_gpus():
  """The CUDA kernels on 2 GPUs, bfloat16: dense attention split over batch and over heads
  (also with split-KV), paged decode and the donated paged update split over KV heads, and
  the MLP rows; each shard's result equals the one-GPU run's bit for bit (same kernel, same
  rows)."""
  rng, randn = rng_and_randn(9)
  line = auto_mesh((2,), ("x",))
  heads = P(None, None, "x")

  def bf16(*shape):
    return jnp.asarray(randn(*shape), jnp.bfloat16)

  q, k, v = bf16(2, 384, 8, 128), bf16(2, 509, 4, 128), bf16(2, 509, 4, 128)
  check_batch_and_head_splits(q, k, v, line)
  check_split(
    "split-KV",
    lambda q, k, v: jax_fmha.attention(q, k, v, causal=True, num_splits=3),
    (q, k, v),
    [heads] * 3,
    line,
    [heads],
    [(3, 2, 384, 4, 128), (3, 2, 4, 384), (2, 384, 4, 128), (2, 384, 4)],
  )

  (k_pages, v_pages), table = paged_pool(rng, randn, 4, 5, 16, 4, 128)
  k_pages, v_pages = (jnp.asarray(x, jnp.bfloat16) for x in (k_pages, v_pages))
  lens = np.array([70, 1, 33, 80], np.int32)
  check_split(
    "paged decode",
    lambda q, kp, vp, t, n: jax_fmha.attention(
      q, kp, vp, block_table=t, seq_lens=n, causal=True, num_splits=1
    ),
    (bf16(4, 1, 8, 128), k_pages, v_pages, table, lens),
    [heads, heads, heads, P(), P()],
    line,
    [heads],
    [(4, 1, 4, 128), (4, 4, 1)],
  )
  lens_before_append = np.array([67, 0, 30, 77], np.int32)  # 3 new tokens fill up to 80
  placed, hlo = check_split(
    "paged update",
    lambda kc, vc, kn, vn, t, n: jax_fmha.update_kv_cache(kc, vc, kn, vn, t, n),
    (k_pages, v_pages, bf16(4, 3, 4, 128), bf16(4, 3, 4, 128), table, lens_before_append),
    [heads] * 4 + [P(), P()],
    line,
    [heads, heads],
    [(22, 16, 2, 128)] * 2,
    donate=(0, 1),
  )
  check_in_place("paged update", placed, hlo, (22, 16, 2, 128))

  x, residual, weight = bf16(8, 6, 512), bf16(8, 6, 512), bf16(512)
  rows = P("x")
  check_split(
    "rms_norm_residual",
    jax_fmha.rms_norm_residual,
    (x, residual, weight),
    [rows, rows, P()],
    line,
    [rows, rows],
    [(4, 6, 512)] * 2,
  )
  check_split("swiglu", jax_fmha.swiglu, (x, residual), [heads] * 2, line, [heads], [(8, 6, 256)])


# ---------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------


def test_attention_splits_over_batch_and_heads():
  run_case(attention_splits, devices=4)


def test_cache_updates_stay_in_place():
  run_case(cache_updates_in_place, devices=4)


def test_merge_and_mlp_split_by_rows():
  run_case(merge_and_mlp_split_rows, devices=4)


def test_explicit_mesh_types_and_errors():
  run_case(explicit_mesh, devices=4)


def test_shard_map_outputs_vary_over_every_operand_axis():
  run_case(shard_map_varying_axes, devices=4)


def test_gspmd_partitioner_and_meshless_programs():
  run_case(gspmd_partitioner, devices=4)


def test_decode_step_on_8_devices():
  run_case(decode_step_on_8_devices, devices=8)


def test_fp8_cache_decode_step_splits_scales_with_heads():
  run_case(fp8_cache_decode_step, devices=4)


def gpu_count() -> int:
  try:
    return len(jax.devices("gpu"))
  except RuntimeError:  # no GPU backend
    return 0


@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs")
def test_cuda_kernels_split_over_two_gpus():
  run_case(two_gpus, devices=None)


if __name__ == "__main__":
  case = globals()[sys.argv[1]]
  case()
  print(f"{case.__name__} ok")
