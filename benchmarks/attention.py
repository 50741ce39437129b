"""Attention benchmarks: jax_fmha against the attention a JAX user can reach for, in one run.

    python benchmarks/attention.py --backend gpu --suite all \
        --out benchmarks/results/h200/attention.json
    python benchmarks/attention.py --backend cpu --suite cpu \
        --out benchmarks/results/cpu-2core/attention.json
    python benchmarks/tools/results_md.py benchmarks/results/h200   # RESULTS.md from the JSONs

Suites (``--suite``): prefill, gqa, paged (paged prefill, and chunked prefill: new queries
over a longer paged cache, GQA 32/8, causal from the bottom right), decode (paged decode), varlen
(packed mixed batches), ``all`` (the five), and ``cpu`` (prefill and paged decode at sizes
a 2-core CPU runs in a few minutes). Each case runs every implementation on the same random
inputs: ``jax_fmha`` (ours), then the peers ``xla`` and ``cudnn``
(``jax.nn.dot_product_attention``), ``pallas`` (the Triton attention shipped with jax) and
``fa3`` (flash_attn3_jax, when importable). A peer without a paged or packed mode does what
a user would do, inside the timed function: gather the pages through the block table
(``jnp.take``), pad packed sequences to a batch with length masks, or use segment ids. A
peer that cannot run a case is skipped with a note in the row.

Timing: each function is jitted once and warmed up, then timed with ``block_until_ready``
(median of the samples; each sample loops over calls until it lasts 20 ms on the GPU,
2 ms on the CPU); 3 input sets are rotated when one set is small enough to stay in cache.
Rates: TFLOP/s with FlashAttention-3's count (4 * B * Hq * Sq * Sk * D, half when causal;
chunked prefill counts the (query, key) pairs its causal mask leaves),
or, for decode, GB/s of KV-cache bytes read (2 * B * Sk * Hkv * D * itemsize / time). The
decode suite on the GPU also runs FP8 (float8_e4m3fn) caches at pages 16 and 256, against
ours over the same values in a bfloat16 cache (``jax_fmha_bf16_cache``): GB/s of FP8 bytes,
and tokens/s (B / time) in every decode row.
``speedup`` is the best peer's time over ours (> 1: ours is faster).

Importable (see attention.ipynb): ``run(...)`` returns the results dict written as JSON,
``format_row``, ``load_results`` and ``plot_suite`` read it back.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jax_fmha

SUITES = ("prefill", "gqa", "paged", "decode", "varlen", "fp8")
OURS = "jax_fmha"
DENSE = "jax_fmha_dense"  # paged suite: our dense prefill on the gathered keys (not a peer)
DEQUANTIZED = "jax_fmha_dequantized"  # fp8 suite: ours on the same values in 16 bits (not a peer)
FP8_QK = "jax_fmha_fp8_qk"  # fp8 suite: ours on e4m3 q and k, v in 16 bits (not a peer)
BF16_CACHE = "jax_fmha_bf16_cache"  # FP8 decode rows: ours over the same cache in bf16 (not a peer)
NOT_PEERS = (OURS, DENSE, DEQUANTIZED, FP8_QK, BF16_CACHE)

# Shapes per size: "full" for the GPU, "cpu" for a CPU run (about a minute per suite on
# 2 cores), "small" (--small) for a quick check on either.
SIZES = {
  "full": dict(
    tokens=16384,
    seqlens=(512, 1024, 2048, 4096, 8192, 16384),
    hidden=2048,
    head_dims=(64, 128, 256),
    gqa_tokens=16384,
    gqa_seqlens=(512, 1024, 2048, 4096, 8192, 16384),
    paged_tokens=16384,
    paged_seqlens=(2048, 8192),
    paged_heads=16,
    chunked=((4, 512, 8704),),  # (B, new queries, keys): 512 new tokens on 8k cached
    decode_batches=(1, 4, 16, 64, 256),
    decode_kv=(1024, 4096, 16384, 131072),
    decode_max_tokens=2**20,  # B * Sk cap: 4 GiB of bf16 K+V at 8 KV heads, d128
    fp8_decode=((64, 4096), (8, 32768), (1, 131072)),  # (B, Sk), at pages 16 and 256
    # FP8 prefill (B, S, heads, D, causal): 16k tokens, heads x D = 2048
    fp8_prefill=(
      (1, 16384, 16, 128, False),
      (1, 16384, 16, 128, True),
      (4, 4096, 16, 128, False),
      (2, 8192, 8, 256, False),
    ),
    varlen_tokens=16384,
    varlen_max=(512, 2048, 8192),
    varlen_heads=16,
  ),
  "cpu": dict(
    tokens=2048,
    seqlens=(512, 2048),
    hidden=512,
    head_dims=(64, 128),
    gqa_tokens=512,
    gqa_seqlens=(256, 512),
    paged_tokens=1024,
    paged_seqlens=(1024,),
    paged_heads=4,
    chunked=((1, 128, 1152),),
    decode_batches=(1, 8),
    decode_kv=(1024, 8192),
    decode_max_tokens=2**16,
    fp8_decode=((8, 8192),),
    fp8_prefill=((1, 1024, 4, 128, False), (1, 1024, 4, 128, True)),
    varlen_tokens=2048,
    varlen_max=(256, 1024),
    varlen_heads=4,
  ),
  "small": dict(
    tokens=512,
    seqlens=(128, 512),
    hidden=256,
    head_dims=(64, 128),
    gqa_tokens=256,
    gqa_seqlens=(128, 256),
    paged_tokens=256,
    paged_seqlens=(256,),
    paged_heads=2,
    chunked=((1, 32, 320),),
    decode_batches=(1, 4),
    decode_kv=(256, 1024),
    decode_max_tokens=2**12,
    fp8_decode=((4, 1024),),
    fp8_prefill=((1, 256, 2, 64, True),),
    varlen_tokens=512,
    varlen_max=(128, 512),
    varlen_heads=2,
  ),
}
PAGE_SIZES = (16, 64, 256)
CHUNKED = dict(q_heads=32, kv_heads=8, head_dim=128, pages=(16, 64))
DECODE = dict(q_heads=32, kv_heads=8, head_dim=128, page=16)
FP8_DECODE_PAGES = (16, 256)

# Timing per implementation and case: timed samples until the budget is spent (at least
# one, at most max_reps); a sample loops over calls until it lasts min_sample_s.
TIMING = {
  "gpu": dict(budget_s=0.3, max_reps=15, min_sample_s=20e-3),
  "cpu": dict(budget_s=3.0, max_reps=10, min_sample_s=2e-3),
}
ROTATE_BELOW_BYTES = 64 << 20  # one input set this small may sit in cache: rotate 3 sets
XLA_SCORES_LIMIT = {"gpu": 8 << 30, "cpu": 4 << 30}  # XLA materializes B*Hq*Sq*Sk fp32 scores
MAX_LOOP_CALLS = 200


class Skip(Exception):
  """An implementation that does not run a case; the message says why."""


@dataclasses.dataclass
class Impl:
  fn: Callable[[dict], jax.Array]  # timed under jit: inputs -> output in ours' layout
  prepare: Callable[[dict], dict] | None = None  # untimed, once per input set (layouts)


@dataclasses.dataclass
class Case:
  suite: str
  group: str  # plot panel
  x: int  # plot x-axis
  label: str
  shape: dict
  make_inputs: Callable[[jax.Array], dict]  # PRNG key -> inputs
  impls: dict  # name -> Impl, or a str: why that peer is skipped
  work: float  # FLOPs, or bytes for GB/s
  metric: str  # "TFLOP/s" or "GB/s"
  tokens: int = 0  # decode: tokens one call generates (one a sequence), for tokens/s
  # Relative tolerance added to the output comparisons: ours rounds P to e4m3 with FP8 v,
  # which moves an output by up to 2^-4 of max |v| (docs/design/fp8_attention.md).
  extra_tolerance: float = 0.0


# ---------------------------------------------------------------------------------------
# Peers.


@dataclasses.dataclass
class Peers:
  backend: str
  device: jax.Device | None = None
  pallas_mha: Callable | None = None
  pallas_paged: Callable | None = None
  fa3: object | None = None
  notes: dict = dataclasses.field(default_factory=dict)


def probe_peers(backend: str, device: jax.Device | None = None) -> Peers:
  peers = Peers(backend, device)
  if backend != "gpu":
    peers.notes["cudnn, pallas, fa3"] = "GPU only"
    return peers
  try:
    from jax.experimental.pallas.ops.gpu import (
      attention as pallas_attention,
      paged_attention as pallas_paged,
    )

    peers.pallas_mha = pallas_attention.mha
    peers.pallas_paged = pallas_paged.paged_attention
  except Exception as e:  # noqa: BLE001 - any import failure means "not available"
    peers.notes["pallas"] = f"not importable: {_short(e)}"
  try:
    import flash_attn3_jax

    peers.fa3 = flash_attn3_jax
    peers.notes["fa3"] = f"flash_attn3_jax {getattr(flash_attn3_jax, '__version__', '?')}"
  except Exception as e:  # noqa: BLE001
    peers.notes["fa3"] = f"not importable: {_short(e)}"
  return peers


def sdpa(q, k, v, implementation, **kw):
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kw)


def gather_pages(pages, block_table):
  """[num_pages, page, H, D] through [B, pages_per_seq] -> contiguous [B, S, H, D]."""
  g = jnp.take(pages, block_table, axis=0, mode="clip")
  return g.reshape(block_table.shape[0], -1, *pages.shape[2:])


def fa3_fn(peers: Peers, name: str) -> Callable:
  fn = getattr(peers.fa3, name, None) if peers.fa3 is not None else None
  if fn is None:
    raise Skip(
      peers.notes.get("fa3", "") if peers.fa3 is None else f"flash_attn3_jax has no {name}"
    )
  return fn


def xla_fits(backend, batch, q_heads, sq, sk) -> None:
  need = batch * q_heads * sq * sk * 4
  if need > XLA_SCORES_LIMIT[backend]:
    raise Skip(f"skipped: XLA's scores need {need / 2**30:.0f} GiB")


def guarded(builders: dict) -> dict:
  """name -> zero-argument builder of an Impl; a builder raising Skip becomes its note."""
  impls = {}
  for name, build in builders.items():
    try:
      impls[name] = build()
    except Skip as e:
      impls[name] = str(e)
  return impls


def gpu_peers(peers: Peers, builders: dict) -> dict:
  """Drops the GPU-only builders on the CPU."""
  gpu_only = ("cudnn", "pallas", "fa3")
  return {n: b for n, b in builders.items() if peers.backend == "gpu" or not n.startswith(gpu_only)}


def pallas_fn(peers: Peers, name: str) -> Callable:
  """ "pallas_mha" or "pallas_paged", or Skip with the reason it is missing."""
  fn = getattr(peers, name)
  if fn is None:
    raise Skip(peers.notes.get("pallas", "not importable"))
  return fn


# ---------------------------------------------------------------------------------------
# Cases.


def random_qkv(key, q_shape, kv_shape, dtype) -> dict:
  kq, kk, kv = jax.random.split(key, 3)
  return dict(
    q=jax.random.normal(kq, q_shape, dtype),
    k=jax.random.normal(kk, kv_shape, dtype),
    v=jax.random.normal(kv, kv_shape, dtype),
  )


def dense_case(
  suite, peers, *, batch, seq, q_heads, kv_heads, head_dim, causal, dtype, group
) -> Case:
  """Self-attention prefill, [B, S, H, D] in and out (prefill and gqa suites)."""
  scale = 1.0 / math.sqrt(head_dim)
  rep = q_heads // kv_heads

  def pallas():
    mha = pallas_fn(peers, "pallas_mha")

    def fn(x):
      k, v = (jnp.repeat(x[n], rep, axis=2) for n in ("k", "v"))  # MHA only: repeat KV heads
      return mha(x["q"], k, v, segment_ids=None, sm_scale=scale, causal=causal)

    return Impl(fn)

  def xla():
    xla_fits(peers.backend, batch, q_heads, seq, seq)
    return Impl(lambda x: sdpa(x["q"], x["k"], x["v"], "xla", is_causal=causal))

  def fa3():
    flash_mha = fa3_fn(peers, "flash_mha")
    return Impl(lambda x: flash_mha(x["q"], x["k"], x["v"], is_causal=causal))

  impls = guarded(
    gpu_peers(
      peers,
      {
        OURS: lambda: Impl(lambda x: jax_fmha.attention(x["q"], x["k"], x["v"], causal=causal)),
        "xla": xla,
        "cudnn": lambda: Impl(lambda x: sdpa(x["q"], x["k"], x["v"], "cudnn", is_causal=causal)),
        "pallas": pallas,
        "fa3": fa3,
      },
    )
  )
  flops = 4 * batch * q_heads * seq * seq * head_dim / (2 if causal else 1)
  heads = f"h{q_heads}" if q_heads == kv_heads else f"h{q_heads}/{kv_heads}"
  return Case(
    suite=suite,
    group=group,
    x=seq,
    label=f"b{batch} s{seq} {heads} d{head_dim} {_name(dtype)}{' causal' if causal else ''}",
    shape=dict(
      batch=batch,
      seqlen_q=seq,
      seqlen_k=seq,
      q_heads=q_heads,
      kv_heads=kv_heads,
      head_dim=head_dim,
      causal=causal,
      dtype=_name(dtype),
    ),
    make_inputs=lambda key: random_qkv(
      key, (batch, seq, q_heads, head_dim), (batch, seq, kv_heads, head_dim), dtype
    ),
    impls=impls,
    work=flops,
    metric="TFLOP/s",
  )


def paged_inputs(key, *, batch, seq_q, seq_k, q_heads, kv_heads, head_dim, page, dtype) -> dict:
  """q [B, Sq, Hq, D]; pages [B * Sk / page, page, Hkv, D] in a random permuted order."""
  num_pages = batch * seq_k // page
  kq, kk, kv, kp = jax.random.split(key, 4)
  pages_shape = (num_pages, page, kv_heads, head_dim)
  return dict(
    q=jax.random.normal(kq, (batch, seq_q, q_heads, head_dim), dtype),
    k=jax.random.normal(kk, pages_shape, dtype),
    v=jax.random.normal(kv, pages_shape, dtype),
    block_table=jax.random.permutation(kp, num_pages)
    .astype(jnp.int32)
    .reshape(batch, seq_k // page),
    seq_lens=jnp.full((batch,), seq_k, jnp.int32),
  )


def paged_gather_impl(implementation, causal) -> Impl:
  """Gather-then-attend: the pages into contiguous keys, then jax.nn with a length mask."""

  def fn(x):
    k, v = (gather_pages(x[n], x["block_table"]) for n in ("k", "v"))
    return sdpa(x["q"], k, v, implementation, is_causal=causal, key_value_seq_lengths=x["seq_lens"])

  return Impl(fn)


def paged_prefill_case(peers, *, batch, seq, heads, head_dim, page, causal, dtype) -> Case:
  """Self-attention over a paged cache: Sq = Sk = seq, as many KV heads as query heads."""
  return paged_case(
    peers,
    batch=batch,
    seq_q=seq,
    seq_k=seq,
    q_heads=heads,
    kv_heads=heads,
    head_dim=head_dim,
    page=page,
    causal=causal,
    dtype=dtype,
    group=f"s{seq} {_name(dtype)}{' causal' if causal else ''}",
    label=f"b{batch} s{seq} h{heads} d{head_dim} page{page} {_name(dtype)}"
    f"{' causal' if causal else ''}",
    work=4 * batch * heads * seq * seq * head_dim / (2 if causal else 1),
  )


def chunked_prefill_case(peers, *, batch, seq_q, seq_k, page, dtype) -> Case:
  """Chunked prefill: seq_q new queries over seq_k paged keys (the cache holds the chunk),
  causal from the bottom right, CHUNKED's heads. The peers that gather pages for
  jax.nn (whose causal mask is aligned top left) or Pallas would not compute this mask, so
  flash_attn3_jax is the peer, with our dense prefill on the gathered keys beside it."""
  hq, hkv, d = CHUNKED["q_heads"], CHUNKED["kv_heads"], CHUNKED["head_dim"]
  pairs = seq_q * (seq_k - seq_q) + seq_q * (seq_q + 1) // 2  # visible under the mask
  return paged_case(
    peers,
    batch=batch,
    seq_q=seq_q,
    seq_k=seq_k,
    q_heads=hq,
    kv_heads=hkv,
    head_dim=d,
    page=page,
    causal=True,
    dtype=dtype,
    group=f"chunked {seq_q} on {seq_k} h{hq}/{hkv} {_name(dtype)} causal",
    label=f"b{batch} chunk{seq_q} sk{seq_k} h{hq}/{hkv} d{d} page{page} {_name(dtype)} causal",
    work=4 * batch * hq * pairs * d,
    jax_nn_peers=False,
  )


def paged_case(
  peers,
  *,
  batch,
  seq_q,
  seq_k,
  q_heads,
  kv_heads,
  head_dim,
  page,
  causal,
  dtype,
  group,
  label,
  work,
  jax_nn_peers=True,
) -> Case:
  scale = 1.0 / math.sqrt(head_dim)

  def ours(x):
    return jax_fmha.attention(
      x["q"], x["k"], x["v"], block_table=x["block_table"], seq_lens=x["seq_lens"], causal=causal
    )

  def dense_prepare(x):
    return dict(
      x, k=gather_pages(x["k"], x["block_table"]), v=gather_pages(x["v"], x["block_table"])
    )

  def pallas():
    mha = pallas_fn(peers, "pallas_mha")

    def fn(x):
      k, v = (gather_pages(x[n], x["block_table"]) for n in ("k", "v"))
      return mha(x["q"], k, v, segment_ids=None, sm_scale=scale, causal=causal)

    return Impl(fn)

  def xla():
    xla_fits(peers.backend, batch, q_heads, seq_q, seq_k)
    return paged_gather_impl("xla", causal)

  def fa3():
    with_kvcache = fa3_fn(peers, "flash_mha_with_kvcache")
    return Impl(
      lambda x: with_kvcache(
        x["q"],
        x["k"],
        x["v"],
        cache_seqlens=x["seq_lens"],
        page_table=x["block_table"],
        is_causal=causal,
      )
    )

  builders = {
    OURS: lambda: Impl(ours),
    DENSE: lambda: Impl(
      lambda x: jax_fmha.attention(x["q"], x["k"], x["v"], causal=causal), prepare=dense_prepare
    ),
  }
  if jax_nn_peers:
    builders |= {
      "xla_gather": xla,
      "cudnn_gather": lambda: paged_gather_impl("cudnn", causal),
      "pallas_gather": pallas,
    }
  builders["fa3"] = fa3
  shape = dict(
    batch=batch,
    seqlen_q=seq_q,
    seqlen_k=seq_k,
    q_heads=q_heads,
    kv_heads=kv_heads,
    head_dim=head_dim,
    page_size=page,
    causal=causal,
    dtype=_name(dtype),
  )
  return Case(
    suite="paged",
    group=group,
    x=page,
    label=label,
    shape=shape,
    make_inputs=lambda key: paged_inputs(
      key,
      batch=batch,
      seq_q=seq_q,
      seq_k=seq_k,
      q_heads=q_heads,
      kv_heads=kv_heads,
      head_dim=head_dim,
      page=page,
      dtype=dtype,
    ),
    impls=guarded(gpu_peers(peers, builders)),
    work=work,
    metric="TFLOP/s",
  )


def our_num_splits(*, batch, q_heads, kv_heads, seq_q, seq_k, head_dim, page, device) -> int:
  """The split-KV count jax_fmha picks for a shape on `device` (shown in decode rows, and
  given to flash_attn3_jax as `fa3_splits`)."""
  from jax_fmha._split_plan import num_splits

  return int(
    num_splits(
      batch=batch,
      num_kv_heads=kv_heads,
      group=q_heads // kv_heads,
      max_seqlen_q=seq_q,
      max_seqlen_k=seq_k,
      head_dim=head_dim,
      page_size=page,
      device=device,
    )
  )


def decode_shape(*, batch, seq_k, page, dtype, **extra) -> dict:
  """The shape of a decode row (DECODE's heads and head dim)."""
  return dict(
    batch=batch,
    seqlen_q=1,
    seqlen_k=seq_k,
    q_heads=DECODE["q_heads"],
    kv_heads=DECODE["kv_heads"],
    head_dim=DECODE["head_dim"],
    page_size=page,
    dtype=_name(dtype),
    **extra,
  )


def decode_inputs(key, *, batch, seq_k, page, dtype) -> dict:
  """A decode row's paged inputs (DECODE's heads and head dim)."""
  return paged_inputs(
    key,
    batch=batch,
    seq_q=1,
    seq_k=seq_k,
    q_heads=DECODE["q_heads"],
    kv_heads=DECODE["kv_heads"],
    head_dim=DECODE["head_dim"],
    page=page,
    dtype=dtype,
  )


def decode_case(peers, *, batch, seq_k, dtype) -> Case:
  q_heads, kv_heads, head_dim, page = (
    DECODE[n] for n in ("q_heads", "kv_heads", "head_dim", "page")
  )
  splits = our_num_splits(
    batch=batch,
    q_heads=q_heads,
    kv_heads=kv_heads,
    seq_q=1,
    seq_k=seq_k,
    head_dim=head_dim,
    page=page,
    device=peers.device,
  )

  def ours(x):
    return jax_fmha.attention(
      x["q"], x["k"], x["v"], block_table=x["block_table"], seq_lens=x["seq_lens"]
    )

  def pallas():
    paged_attention = pallas_fn(peers, "pallas_paged")

    # Its cache layout is [Hkv, num_pages, page, D]: a user of it stores the cache that way.
    # It has no softmax scale: the queries are scaled first.
    def prepare(x):
      return dict(x, k=jnp.moveaxis(x["k"], 2, 0), v=jnp.moveaxis(x["v"], 2, 0))

    scale = 1.0 / math.sqrt(head_dim)
    return Impl(
      lambda x: paged_attention(
        x["q"][:, 0] * scale, x["k"], x["v"], x["block_table"], x["seq_lens"]
      )[:, None],
      prepare=prepare,
    )

  def fa3(num_splits):
    with_kvcache = fa3_fn(peers, "flash_mha_with_kvcache")
    return Impl(
      lambda x: with_kvcache(
        x["q"],
        x["k"],
        x["v"],
        cache_seqlens=x["seq_lens"],
        page_table=x["block_table"],
        num_splits=num_splits,
      )
    )

  def fa3_splits():  # flash_attn3_jax given our split count (its default is 1)
    if splits == 1:
      raise Skip("ours uses no split here")
    return fa3(splits)

  impls = guarded(
    gpu_peers(
      peers,
      {
        OURS: lambda: Impl(ours),
        "xla_gather": lambda: paged_gather_impl("xla", False),
        "cudnn_gather": lambda: paged_gather_impl("cudnn", False),
        "pallas": pallas,
        "fa3": lambda: fa3(1),
        "fa3_splits": fa3_splits,
      },
    )
  )
  kv_bytes = 2 * batch * seq_k * kv_heads * head_dim * jnp.dtype(dtype).itemsize
  return Case(
    suite="decode",
    group=f"batch {batch} {_name(dtype)}",
    x=seq_k,
    label=f"b{batch} sk{seq_k} h{q_heads}/{kv_heads} d{head_dim} page{page} {_name(dtype)}",
    shape=decode_shape(batch=batch, seq_k=seq_k, page=page, dtype=dtype, num_splits=splits),
    make_inputs=lambda key: decode_inputs(key, batch=batch, seq_k=seq_k, page=page, dtype=dtype),
    impls=impls,
    work=kv_bytes,
    metric="GB/s",
    tokens=batch,
  )


def fp8_decode_case(*, batch, seq_k, page, cache_dtype, dtype) -> Case:
  """Paged decode over an FP8 cache (the bf16 rows' shape, jax_fmha.quantize_kv's scales),
  against ours over the same values in a bfloat16 cache; GB/s of FP8 bytes read."""
  q_heads, kv_heads, head_dim = (DECODE[n] for n in ("q_heads", "kv_heads", "head_dim"))

  def make_inputs(key):
    x = decode_inputs(key, batch=batch, seq_k=seq_k, page=page, dtype=dtype)
    k, k_scale = jax_fmha.quantize_kv(x["k"], cache_dtype)
    v, v_scale = jax_fmha.quantize_kv(x["v"], cache_dtype)
    return dict(x, k=k, v=v, k_scale=k_scale, v_scale=v_scale)

  def ours(x):
    return jax_fmha.attention(
      x["q"],
      x["k"],
      x["v"],
      block_table=x["block_table"],
      seq_lens=x["seq_lens"],
      k_scale=x["k_scale"],
      v_scale=x["v_scale"],
    )

  def dequantize(x):  # untimed: the bfloat16 cache holding the same values
    def bf16(cache, scale):
      return jax_fmha.reference.dequantize_fp8(cache, scale).astype(dtype)

    return dict(x, k=bf16(x["k"], x["k_scale"]), v=bf16(x["v"], x["v_scale"]))

  def bf16_cache(x):
    return jax_fmha.attention(
      x["q"], x["k"], x["v"], block_table=x["block_table"], seq_lens=x["seq_lens"]
    )

  name = _name(cache_dtype)
  return Case(
    suite="decode",
    group=f"{name} cache page {page}",
    x=seq_k,
    label=f"b{batch} sk{seq_k} h{q_heads}/{kv_heads} d{head_dim} page{page} {name}",
    shape=decode_shape(batch=batch, seq_k=seq_k, page=page, dtype=dtype, cache_dtype=name),
    make_inputs=make_inputs,
    impls={OURS: Impl(ours), BF16_CACHE: Impl(bf16_cache, prepare=dequantize)},
    work=2 * batch * seq_k * kv_heads * head_dim,  # one byte an element
    metric="GB/s",
    tokens=batch,
  )


def per_tensor_e4m3(x):
  """x -> (x in float8_e4m3fn, its float32 scalar scale): one amax scale for the whole
  tensor, the only form cuDNN's FP8 attention takes, so that every implementation of the
  fp8 suite computes on the same values."""
  scale = jnp.max(jnp.abs(x.astype(jnp.float32))) / float(jnp.finfo(jnp.float8_e4m3fn).max)
  return jax_fmha.reference.quantize_fp8(x, scale, jnp.float8_e4m3fn), scale


def cudnn_fp8_fn(causal, scale):
  """cuDNN's FP8 attention (e4m3 q, k, v; FP8 P; e4m3 output with scale 1), through JAX's
  private entry point, which takes per-tensor descales as [1, 1, 1, 1] arrays."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_sdpa
  except Exception as e:
    raise Skip(f"not importable: {_short(e)}") from e
  one = jnp.ones((1, 1, 1, 1), jnp.float32)
  mask = cudnn_sdpa.MaskType.CAUSAL if causal else cudnn_sdpa.MaskType.NO_MASK

  def fn(x):
    params = dict.fromkeys(cudnn_sdpa.fp8_params_keys, one)
    for n in ("q", "k", "v"):
      params[f"descale_{n}"] = jnp.reshape(x[f"{n}_scale"], (1, 1, 1, 1))
    out, _, _ = cudnn_sdpa.dot_product_attention(
      x["q"], x["k"], x["v"], fp8_params=params, scale=scale, mask_type=mask, use_fp8=True
    )
    return out

  return fn


def fp8_prefill_case(peers, *, batch, seq, heads, head_dim, causal, dtype) -> Case:
  """FP8 self-attention prefill: e4m3 q, k, v with per-tensor scales; ours, cuDNN's FP8
  attention, and ours on the same values dequantized to the run's dtype. TFLOP/s count
  the FLOPs as for 16-bit inputs."""
  shape = (batch, seq, heads, head_dim)
  scale = 1.0 / math.sqrt(head_dim)

  def make_inputs(key):
    x = random_qkv(key, shape, shape, dtype)
    out = {}
    for n in ("q", "k", "v"):
      out[n], out[f"{n}_scale"] = per_tensor_e4m3(x[n])
    return out

  def ours(x):
    return jax_fmha.attention(
      x["q"],
      x["k"],
      x["v"],
      q_scale=x["q_scale"],
      k_scale=x["k_scale"],
      v_scale=x["v_scale"],
      causal=causal,
    )

  def dequantize(x, names="qkv", to=dtype):  # untimed: the inputs holding the same values
    return {
      **x,
      **{n: jax_fmha.reference.dequantize_fp8(x[n], x[f"{n}_scale"]).astype(to) for n in names},
    }

  def fp8_qk(x):  # FP8 Q K^T, P V in the run's dtype (the Hopper kernel's mixed variant)
    return jax_fmha.attention(
      x["q"], x["k"], x["v"], q_scale=x["q_scale"], k_scale=x["k_scale"], causal=causal
    )

  impls = guarded(
    gpu_peers(
      peers,
      {
        OURS: lambda: Impl(ours),
        DEQUANTIZED: lambda: Impl(
          lambda x: jax_fmha.attention(x["q"], x["k"], x["v"], causal=causal), prepare=dequantize
        ),
        # (v 16-bit: bfloat16 when the run's dtype is float32, on the CPU)
        FP8_QK: lambda: Impl(
          fp8_qk,
          prepare=lambda x: dequantize(
            x, "v", jnp.bfloat16 if jnp.dtype(dtype).itemsize == 4 else dtype
          ),
        ),
        "cudnn_fp8": lambda: Impl(cudnn_fp8_fn(causal, scale)),
      },
    )
  )
  return Case(
    suite="fp8",
    group=f"d{head_dim} e4m3fn{' causal' if causal else ''}",
    x=seq,
    label=f"b{batch} s{seq} h{heads} d{head_dim} e4m3fn{' causal' if causal else ''}",
    shape=dict(
      batch=batch,
      seqlen_q=seq,
      seqlen_k=seq,
      q_heads=heads,
      kv_heads=heads,
      head_dim=head_dim,
      causal=causal,
      dtype="float8_e4m3fn",
    ),
    make_inputs=make_inputs,
    impls=impls,
    work=4 * batch * heads * seq * seq * head_dim / (2 if causal else 1),
    metric="TFLOP/s",
    extra_tolerance=2.0**-4,
  )


def random_lengths(rng, tokens, max_len) -> list[int]:
  """Random sequence lengths in [1, max_len] that add up to exactly `tokens`."""
  lengths = []
  while (left := tokens - sum(lengths)) > 0:
    lengths.append(min(int(rng.integers(1, max_len + 1)), left))
  return lengths


def varlen_case(peers, *, tokens, max_len, heads, head_dim, dtype, seed) -> Case:
  """Causal prefill of a packed mixed batch: [T, H, D] with cu_seqlens."""
  lengths = random_lengths(np.random.default_rng(seed), tokens, max_len)
  batch, longest = len(lengths), max(lengths)
  cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
  # Padded layout for jax.nn: pad[b, i] = packed row of token i of sequence b (clamped);
  # unpad[t] = padded row of packed token t.
  pad_index = np.minimum(cu[:-1, None] + np.arange(longest), cu[1:, None] - 1)
  seq_of = np.repeat(np.arange(batch), lengths)
  unpad_index = seq_of * longest + np.arange(tokens) - cu[seq_of]
  scale = 1.0 / math.sqrt(head_dim)

  def ours(x):
    return jax_fmha.attention(
      x["q"],
      x["k"],
      x["v"],
      cu_seqlens_q=x["cu_seqlens"],
      cu_seqlens_k=x["cu_seqlens"],
      max_seqlen_q=longest,
      max_seqlen_k=longest,
      causal=True,
    )

  def padded(implementation):
    def fn(x):
      q, k, v = (x[n][x["pad_index"]] for n in ("q", "k", "v"))
      out = sdpa(
        q,
        k,
        v,
        implementation,
        is_causal=True,
        query_seq_lengths=x["lengths"],
        key_value_seq_lengths=x["lengths"],
      )
      return out.reshape(-1, heads, head_dim)[x["unpad_index"]]

    return fn

  def xla():
    xla_fits(peers.backend, batch, heads, longest, longest)
    return Impl(padded("xla"))

  def pallas():  # one packed sequence; segment ids keep the sequences apart
    mha = pallas_fn(peers, "pallas_mha")
    return Impl(
      lambda x: mha(
        x["q"][None],
        x["k"][None],
        x["v"][None],
        segment_ids=x["segment_ids"][None],
        sm_scale=scale,
        causal=True,
      )[0]
    )

  def fa3():
    flash_mha_varlen = fa3_fn(peers, "flash_mha_varlen")
    return Impl(
      lambda x: flash_mha_varlen(
        x["q"],
        x["k"],
        x["v"],
        cu_seqlens_q=x["cu_seqlens"],
        cu_seqlens_k=x["cu_seqlens"],
        max_seqlen_q=longest,
        max_seqlen_k=longest,
        is_causal=True,
      )
    )

  def make_inputs(key):
    x = random_qkv(key, (tokens, heads, head_dim), (tokens, heads, head_dim), dtype)
    return dict(
      x,
      cu_seqlens=jnp.asarray(cu),
      lengths=jnp.asarray(lengths, jnp.int32),
      pad_index=jnp.asarray(pad_index, jnp.int32),
      unpad_index=jnp.asarray(unpad_index, jnp.int32),
      segment_ids=jnp.asarray(seq_of, jnp.int32),
    )

  impls = guarded(
    gpu_peers(
      peers,
      {
        OURS: lambda: Impl(ours),
        "xla_padded": xla,
        "cudnn_padded": lambda: Impl(padded("cudnn")),
        "pallas_segments": pallas,
        "fa3": fa3,
      },
    )
  )
  flops = sum(4 * heads * n * n * head_dim / 2 for n in lengths)
  return Case(
    suite="varlen",
    group=f"{tokens} tokens h{heads} d{head_dim} {_name(dtype)} causal",
    x=max_len,
    label=f"t{tokens} n{batch} max{longest} h{heads} d{head_dim} {_name(dtype)} causal",
    shape=dict(
      tokens=tokens,
      batch=batch,
      max_len=max_len,
      longest=longest,
      q_heads=heads,
      kv_heads=heads,
      head_dim=head_dim,
      causal=True,
      dtype=_name(dtype),
    ),
    make_inputs=make_inputs,
    impls=impls,
    work=flops,
    metric="TFLOP/s",
  )


def suite_cases(suite: str, size: str, peers: Peers, dtype) -> list[Case]:
  c = SIZES[size]
  cases = []
  if suite == "prefill":
    for d in c["head_dims"]:
      for causal in (False, True):
        for s in c["seqlens"]:
          cases.append(
            dense_case(
              "prefill",
              peers,
              batch=max(1, c["tokens"] // s),
              seq=s,
              q_heads=c["hidden"] // d,
              kv_heads=c["hidden"] // d,
              head_dim=d,
              causal=causal,
              dtype=dtype,
              group=f"d{d} {_name(dtype)}{' causal' if causal else ''}",
            )
          )
  elif suite == "gqa":
    for causal in (False, True):
      for s in c["gqa_seqlens"]:
        cases.append(
          dense_case(
            "gqa",
            peers,
            batch=max(1, c["gqa_tokens"] // s),
            seq=s,
            q_heads=32,
            kv_heads=8,
            head_dim=128,
            causal=causal,
            dtype=dtype,
            group=f"h32/8 d128 {_name(dtype)}{' causal' if causal else ''}",
          )
        )
  elif suite == "paged":
    for causal in (False, True):
      for s in c["paged_seqlens"]:
        for page in PAGE_SIZES:
          if page > s:
            continue
          cases.append(
            paged_prefill_case(
              peers,
              batch=max(1, c["paged_tokens"] // s),
              seq=s,
              heads=c["paged_heads"],
              head_dim=128,
              page=page,
              causal=causal,
              dtype=dtype,
            )
          )
    for b, sq, sk in c["chunked"]:
      for page in CHUNKED["pages"]:
        cases.append(
          chunked_prefill_case(peers, batch=b, seq_q=sq, seq_k=sk, page=page, dtype=dtype)
        )
  elif suite == "decode":
    for b in c["decode_batches"]:
      for sk in c["decode_kv"]:
        if b * sk <= c["decode_max_tokens"]:
          cases.append(decode_case(peers, batch=b, seq_k=sk, dtype=dtype))
    if peers.backend == "gpu":
      for page in FP8_DECODE_PAGES:
        for b, sk in c["fp8_decode"]:
          cases.append(
            fp8_decode_case(
              batch=b, seq_k=sk, page=page, cache_dtype=jnp.float8_e4m3fn, dtype=dtype
            )
          )
  elif suite == "fp8":
    for b, seq, heads, d, causal in c["fp8_prefill"]:
      cases.append(
        fp8_prefill_case(
          peers, batch=b, seq=seq, heads=heads, head_dim=d, causal=causal, dtype=dtype
        )
      )
  elif suite == "varlen":
    for i, m in enumerate(c["varlen_max"]):
      cases.append(
        varlen_case(
          peers,
          tokens=c["varlen_tokens"],
          max_len=m,
          heads=c["varlen_heads"],
          head_dim=128,
          dtype=dtype,
          seed=i,
        )
      )
  else:
    raise ValueError(f"unknown suite {suite!r}")
  return cases


def cpu_cases(peers: Peers) -> list[Case]:
  """The ``cpu`` suite: prefill B=1, 8 heads, d128, fp32 and bf16, causal and full,
  S = 2k/4k/8k, and paged decode (page 16, GQA 32/8, 8 x 8k keys), against XLA."""
  cases = []
  for dtype in (jnp.float32, jnp.bfloat16):
    for causal in (False, True):
      for s in (2048, 4096, 8192):
        cases.append(
          dense_case(
            "prefill",
            peers,
            batch=1,
            seq=s,
            q_heads=8,
            kv_heads=8,
            head_dim=128,
            causal=causal,
            dtype=dtype,
            group=f"b1 h8 d128 {_name(dtype)}{' causal' if causal else ''}",
          )
        )
  for dtype in (jnp.float32, jnp.bfloat16):
    cases.append(decode_case(peers, batch=8, seq_k=8192, dtype=dtype))
  return cases


# ---------------------------------------------------------------------------------------
# Measurement.


def time_call(fn, arg_sets, *, budget_s, max_reps, min_sample_s) -> tuple[float, int]:
  """Median milliseconds per call of a compiled fn, and the number of calls timed.

  A sample times `calls` back-to-back calls (rotating the input sets) and one wait, so
  that host dispatch overlaps the device work of kernels shorter than min_sample_s.
  """
  calls, i = 1, 0

  def sample() -> float:
    nonlocal i
    t0 = time.perf_counter()
    outs = []
    for _ in range(calls):
      outs.append(fn(arg_sets[i % len(arg_sets)]))
      i += 1
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / calls

  once = sample()
  calls = max(1, min(MAX_LOOP_CALLS, math.ceil(min_sample_s / once)))
  if calls > 1 or once < budget_s / 4:
    sample()  # warm-up at the timed rate (clocks, caches); skipped for the slowest calls
    samples = []
  else:
    samples = [once]
  start = time.perf_counter()
  while len(samples) < max_reps and (not samples or time.perf_counter() - start < budget_s):
    samples.append(sample())
  return statistics.median(samples) * 1e3, len(samples) * calls


def mismatch(out, ref, ref_name, extra_tolerance=0.0) -> str | None:
  """A note when an implementation's output differs from the reference's beyond rounding."""
  if out.shape != ref.shape:
    return f"output shape {tuple(out.shape)} differs from {ref_name}'s {tuple(ref.shape)}"
  tol = (1e-3 if ref.dtype == out.dtype == jnp.float32 else 2e-2) + extra_tolerance
  if out.dtype.itemsize == 1:  # FP8 outputs (cuDNN's): half a step of 3 mantissa bits
    tol += 2.0**-4
  out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
  err = float(jnp.max(jnp.abs(out - ref)))
  tol *= max(1.0, float(jnp.max(jnp.abs(ref))))
  return None if err <= tol else f"mismatch: max |out - {ref_name}| = {err:.3g} (> {tol:.2g})"


def measure(case: Case, backend: str, seed: int, timing: dict | None = None) -> dict:
  """Runs every implementation of a case on the same inputs; returns the result row."""
  key = jax.random.key(seed)
  set_bytes = sum(
    a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(case.make_inputs, key))
  )
  num_sets = 3 if set_bytes <= ROTATE_BELOW_BYTES else 1
  input_sets = [case.make_inputs(k) for k in jax.random.split(key, num_sets)]
  row = dict(
    suite=case.suite,
    group=case.group,
    x=case.x,
    label=case.label,
    shape=case.shape,
    metric=case.metric,
    input_sets=num_sets,
    ms={},
    rate={},
    calls={},
    notes={},
  )
  scale = 1e9 if case.metric == "TFLOP/s" else 1e6  # work / ms -> TFLOP/s or GB/s
  reference = None  # (name, output) of the first implementation that ran: ours if it did
  for name, impl in case.impls.items():
    if isinstance(impl, str):
      row["notes"][name] = impl
      continue
    try:
      fn = jax.jit(impl.fn)
      arg_sets = (
        input_sets if impl.prepare is None else [jax.jit(impl.prepare)(x) for x in input_sets]
      )
      out = jax.block_until_ready(fn(arg_sets[0]))  # compiles; the warm-up call
      if reference is None:
        reference = (name, out)
      elif note := mismatch(out, reference[1], reference[0], case.extra_tolerance):
        row["notes"][name] = note
      del out
      ms, calls = time_call(fn, arg_sets, **(timing or TIMING[backend]))
    except Exception as e:  # noqa: BLE001 - a failing implementation is a note, not a crash
      row["notes"][name] = f"failed: {_short(e)}"
      continue
    row["ms"][name] = ms
    row["rate"][name] = case.work / ms / scale
    row["calls"][name] = calls
    if case.tokens:
      row.setdefault("tokens_per_s", {})[name] = case.tokens / (ms / 1e3)
  peers = {
    n: t
    for n, t in row["ms"].items()  # a peer with a wrong output is not compared
    if n not in NOT_PEERS and not row["notes"].get(n, "").startswith("mismatch")
  }
  row["best_peer"] = min(peers, key=peers.get) if peers else None
  row["speedup"] = (
    peers[row["best_peer"]] / row["ms"][OURS] if peers and OURS in row["ms"] else None
  )
  if DENSE in row["ms"] and OURS in row["ms"]:
    row["vs_dense"] = row["ms"][DENSE] / row["ms"][OURS]  # >= 1: paged as fast as dense
  if BF16_CACHE in row["ms"] and OURS in row["ms"]:  # the FP8 cache's tokens/s over bf16's
    row["vs_bf16_cache"] = row["ms"][BF16_CACHE] / row["ms"][OURS]
  return row


# ---------------------------------------------------------------------------------------
# Output.


def format_row(row: dict) -> str:
  def rate(name):
    return f"{row['rate'][name]:.3g}" if name in row["rate"] else "-"

  ours = (
    f"{row['ms'][OURS]:9.3f} ms {rate(OURS):>8}" if OURS in row["ms"] else f"{'-':>12} {'-':>8}"
  )
  others = "  ".join(f"{n} {rate(n)}" for n in row["ms"] if n != OURS)
  tail = f"  x{row['speedup']:.2f} vs {row['best_peer']}" if row.get("speedup") else ""
  if "vs_dense" in row:
    tail += f"  paged/dense x{row['vs_dense']:.2f}"
  if "vs_bf16_cache" in row:
    tail += f"  fp8/bf16 cache x{row['vs_bf16_cache']:.2f}"
  if OURS in row.get("tokens_per_s", {}):
    tail += f"  {row['tokens_per_s'][OURS]:.3g} tokens/s"
  return f"{row['label']:<44} {ours} | {others}{tail}"


def format_notes(row: dict) -> str:
  return "".join(f"\n    {n}: {note}" for n, note in row["notes"].items())


def build_info() -> dict | str:
  try:
    return jax_fmha.build_info()
  except Exception as e:  # noqa: BLE001
    return f"unavailable: {_short(e)}"


def git_revision() -> str | None:
  """The revision measured: $BENCH_REVISION when set (a copy of the tree on a remote machine
  may carry a stale .git), else `git describe` of this checkout."""
  if os.environ.get("BENCH_REVISION"):
    return os.environ["BENCH_REVISION"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    rev = subprocess.run(
      ["git", "-C", root, "describe", "--always", "--dirty"],
      capture_output=True,
      text=True,
      timeout=10,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return rev.stdout.strip() or None


def run(
  suites,
  *,
  backend: str = "cpu",
  dtype=None,
  small: bool = False,
  seed: int = 0,
  budget_s: float | None = None,
  log=print,
  on_row=None,
) -> dict:
  """Runs the suites ("cpu" or names from SUITES); returns the results dict.
  `budget_s` overrides the timing budget per implementation and case (a quick look: 0.2).
  `on_row(results)` is called after each row (main saves the JSON there, so a run cut
  short keeps what it measured)."""
  device = jax.devices(backend)[0]
  dtype = jnp.dtype(dtype or (jnp.float32 if backend == "cpu" else jnp.bfloat16))
  size = "small" if small else ("full" if backend == "gpu" else "cpu")
  peers = probe_peers(backend, device)
  results = dict(
    device=device.device_kind,
    platform=device.platform,
    backend=backend,
    jax_version=jax.__version__,
    jax_fmha_build=build_info(),
    jax_fmha_path=os.path.dirname(jax_fmha.__file__),
    git=git_revision(),
    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    cpu_count=os.cpu_count(),
    load_average=os.getloadavg(),
    dtype=dtype.name,
    size=size,
    suites=list(suites),
    argv=sys.argv,
    peers=peers.notes,
    rows=[],
  )
  log(
    f"device {device.device_kind} ({backend}), jax {jax.__version__}, "
    f"jax_fmha {results['jax_fmha_build']}, peers: {peers.notes}"
  )
  timing = dict(TIMING[backend])
  if budget_s is not None:
    timing.update(budget_s=budget_s, max_reps=min(timing["max_reps"], 5))
  results["timing"] = timing
  begin = time.perf_counter()
  with jax.default_device(device):
    # The time of a trivial jitted call: no kernel can be timed below JAX's dispatch.
    results["dispatch_floor_ms"] = time_call(
      jax.jit(lambda x: x + 1), [jnp.ones(8)], **TIMING[backend]
    )[0]
    log(f"dispatch floor: {results['dispatch_floor_ms'] * 1e3:.1f} us per call")
    for suite in suites:
      cases = cpu_cases(peers) if suite == "cpu" else suite_cases(suite, size, peers, dtype)
      log(
        f"\n== {suite}: {len(cases)} cases; per row: ours ms, ours rate | peers' rates "
        "(TFLOP/s; GB/s for decode) | speedup vs the best peer"
      )
      for i, case in enumerate(cases):
        row = measure(case, backend, seed + i, timing)
        results["rows"].append(row)
        log(f"[{time.perf_counter() - begin:6.0f}s] {format_row(row)}{format_notes(row)}")
        if on_row:
          on_row(results)
  results["load_average_end"] = os.getloadavg()
  return results


def load_results(path) -> dict:
  with open(path) as f:
    return json.load(f)


def plot_suite(rows, suite: str, path=None):
  """One panel per group: each implementation's rate against the case's x. Returns the
  matplotlib figure (saved to `path` when given), or None without matplotlib."""
  try:
    import matplotlib

    if path is not None:
      matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  rows = [r for r in rows if r["suite"] == suite]
  groups = list(dict.fromkeys(r["group"] for r in rows))
  if not groups:
    return None
  cols = min(3, len(groups))
  lines = -(-len(groups) // cols)
  fig, axes = plt.subplots(lines, cols, figsize=(5 * cols, 3.6 * lines), squeeze=False)
  xlabel = {"paged": "page size", "decode": "KV length", "varlen": "max sequence length"}
  for ax, group in zip(axes.flat, groups, strict=False):
    grows = [r for r in rows if r["group"] == group]
    for name in dict.fromkeys(n for r in grows for n in r["rate"]):
      points = [(r["x"], r["rate"][name]) for r in grows if name in r["rate"]]
      ax.plot(
        *zip(*points, strict=True), marker="o", label=name, linewidth=2.5 if name == OURS else 1.2
      )
    ax.set_xscale("log", base=2)
    xs = sorted({r["x"] for r in grows})
    ax.set_xticks(xs, [_tokens(x) for x in xs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_title(group, fontsize=10)
    ax.set_xlabel(xlabel.get(suite, "sequence length"))
    ax.set_ylabel(grows[0]["metric"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(groups) :]:
    ax.set_visible(False)
  fig.suptitle(f"attention {suite}")
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=100)
  return fig


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--suite", default="all", help=f"all, cpu, or a comma list of {', '.join(SUITES)}"
  )
  parser.add_argument(
    "--backend",
    choices=("cpu", "gpu"),
    default=None,
    help="default: gpu when JAX has one, else cpu",
  )
  parser.add_argument("--small", action="store_true", help="small shapes, for a quick check")
  parser.add_argument(
    "--dtype",
    choices=("bfloat16", "float16", "float32"),
    default=None,
    help="default: float32 on the CPU, bfloat16 on the GPU "
    "(the cpu suite runs both float32 and bfloat16)",
  )
  parser.add_argument("--out", help="JSON results path; PNG plots go next to it")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  backend = args.backend or ("gpu" if jax.default_backend() == "gpu" else "cpu")
  suites = SUITES if args.suite == "all" else tuple(args.suite.split(","))
  unknown = [s for s in suites if s not in (*SUITES, "cpu")]
  if unknown:
    parser.error(f"unknown suite {', '.join(unknown)}: choose all, cpu or from {SUITES}")

  def save(results):
    if args.out:
      with open(args.out, "w") as f:
        json.dump(results, f, indent=1)

  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  results = run(
    suites,
    backend=backend,
    dtype=args.dtype,
    small=args.small,
    seed=args.seed,
    log=lambda s: print(s, flush=True),
    on_row=save,
  )
  if not args.out:
    return
  save(results)
  print(f"\nwrote {args.out}")
  stem = os.path.splitext(args.out)[0]
  for suite in dict.fromkeys(r["suite"] for r in results["rows"]):
    path = f"{stem}_{suite}.png"
    if plot_suite(results["rows"], suite, path) is None:
      print("no plots: matplotlib is not importable")
      break
    print(f"wrote {path}")


def _name(dtype) -> str:
  names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "e4m3fn"}
  return names[jnp.dtype(dtype).name]


def _tokens(n: int) -> str:
  return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _short(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:160] if text else ''}"


if __name__ == "__main__":
  main()
