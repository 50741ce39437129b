"""``jax_fmha.attention``: the flash-attention forward and its primitive."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jax_fmha import _ffi, _split_plan, _validation, reference
from jax_fmha._partitioning import SplitRule, fp8_scale_axes
from jax_fmha._primitives import (
  broadcast_batched,
  define_ffi_primitive,
  empty_f32,
  empty_i32,
  map_over_batch,
)
from jax_fmha._validation import AttentionProblem, Backend, KvLayout
from jax_fmha.merge import merge_attention_states


def attention(
  q: ArrayLike,
  k: ArrayLike,
  v: ArrayLike,
  *,
  causal: bool = False,
  scale: float | None = None,
  window: tuple[int, int] = (-1, -1),
  softcap: float = 0.0,
  cu_seqlens_q: ArrayLike | None = None,
  cu_seqlens_k: ArrayLike | None = None,
  max_seqlen_q: int | None = None,
  max_seqlen_k: int | None = None,
  block_table: ArrayLike | None = None,
  seq_lens: ArrayLike | None = None,
  num_splits: int | None = None,
  q_scale: ArrayLike | None = None,
  k_scale: ArrayLike | None = None,
  v_scale: ArrayLike | None = None,
  out_dtype: DTypeLike | None = None,
  return_lse: bool = False,
  backend: Backend = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Scaled dot-product attention, computed by a fused flash-attention kernel.

  Query layouts:
    * dense: ``q [B, Sq, Hq, D]``;
    * packed (variable length): ``q [Tq, Hq, D]`` with ``cu_seqlens_q`` ``[B + 1]``
      prefix sums (first entry 0): sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.

  Key/value layouts (k and v always share one shape):
    * dense: ``k, v [B, Sk, Hkv, D]`` (with dense q);
    * packed: ``k, v [Tk, Hkv, D]`` with ``cu_seqlens_k`` ``[B + 1]`` (with packed q);
    * contiguous cache: ``k, v [B, S_max, Hkv, D]`` with ``seq_lens`` ``[B]``: only the
      first ``seq_lens[b]`` keys of sequence b count;
    * paged cache: ``k, v [num_pages, page_size, Hkv, D]`` with ``block_table``
      ``[B, pages_per_seq]`` (logical page -> physical page) and ``seq_lens`` ``[B]``.
      Any ``page_size >= 1``. Table entries past a sequence's last page are ignored.
    The caches take dense or packed queries (decode: ``Sq = 1``; chunked prefill or
    speculative decoding: ``Sq > 1``; mixed batches: packed).

  Index arrays (``cu_seqlens_*``, ``seq_lens``, ``block_table``) may be Python lists, NumPy
  or jax arrays of any integer dtype (int64 under ``jax_enable_x64`` included); they are
  converted to int32 at trace time, so values must fit int32 (larger ones are the
  caller's error). Float or bool index arrays raise a TypeError.

  ``Hq`` must be a multiple of ``Hkv`` (MHA, GQA, MQA); query head ``h`` attends to KV head
  ``h // (Hq // Hkv)``. ``D`` is a multiple of 8, at most 256. q, k, v share one dtype
  (float32, bfloat16 or float16); the output has that dtype; softmax statistics, partial
  outputs and accumulators are float32. float32 runs on the CPU backend and the reference;
  on the GPU the kernel takes bfloat16/float16: cast (``q.astype(jnp.bfloat16)``, the
  same for k and v); float32 there raises a TypeError at trace time.

  FP8 keys and values (a quantized KV cache, in any layout): k and v of one dtype,
  ``float8_e4m3fn`` or ``float8_e5m2``, stand for ``k * k_scale[b, kv_head]`` and
  ``v * v_scale[b, kv_head]``, with q of any of the dtypes above (the output's). The kernel
  folds the scales into the scores and the output, so the result is attention over the
  dequantized (float32) keys and values. ``jax_fmha.quantize_kv`` makes such a cache;
  ``update_kv_cache`` appends to one. FP8 K/V run on the CPU and CUDA backends and the
  reference; on the GPU q is bfloat16 or float16, as always there.

  FP8 queries (FlashAttention-3's FP8 forward; docs/design/fp8_attention.md): q in
  ``float8_e4m3fn`` or ``float8_e5m2`` with ``q_scale`` (required), k of the same format,
  v of that format too or bfloat16/float16 (then ``P @ V`` runs in v's dtype: "FP8 Q K^T,
  16-bit P V"). Scores are ``scale * q_scale * k_scale * (q8 @ k8.T)``, the output
  ``v_scale * (P @ v8)``, in ``out_dtype``. ``jax_fmha.quantize_fp8`` quantizes q (and k,
  v) with amax scales per sequence and KV head. FP8 queries run on the CPU backend and the
  reference, and on Hopper GPUs (builds with the sm_90a kernel) as float8_e4m3fn q and k
  with float8_e4m3fn v (``P @ V`` on FP8 tensor cores, P rounded to float8_e4m3fn) or
  bfloat16/float16 v; e5m2 queries raise a TypeError at trace time on the GPU.

  Args:
    causal: mask aligned bottom-right: query ``i`` of a sequence with ``Sq`` queries and
      ``Sk`` keys sees keys ``j <= i + Sk - Sq`` (the last query sees every key). Same as
      ``window=(left, 0)``.
    scale: multiplies ``q @ k.T``; default ``1 / sqrt(D)``.
    window: ``(left, right)``: query ``i`` sees keys in
      ``[i + Sk - Sq - left, i + Sk - Sq + right]``; ``-1`` leaves a side unbounded.
    softcap: if ``> 0``, scores become ``softcap * tanh(score / softcap)`` (after scaling,
      before masking).
    max_seqlen_q, max_seqlen_k: static bounds on the packed sequence lengths (default: the
      packed lengths ``Tq``, ``Tk``). A sequence longer than ``max_seqlen_q`` is not
      computed: its output rows are NaN.
    num_splits: split-KV (flash decoding). ``None`` chooses from static shapes and the
      device (more splits when batch x KV heads x query blocks cannot fill the device's
      multiprocessors or CPU threads); ``1`` disables; ``N`` forces N splits, merged with
      ``merge_attention_states``'s kernel.
    q_scale, k_scale, v_scale: dequantization scales of FP8 q, k and v: the float32 factor
      that turns a stored FP8 value into the real one (exactly FlashAttention-3's
      ``q_descale``, ``k_descale``, ``v_descale``: pass those). A Python float, or a float32
      scalar, ``[Hkv]`` (one per KV head) or ``[B, Hkv]`` (per sequence and KV head; B is
      the batch, or the number of sequences of packed q) array. ``q_scale`` is required
      with FP8 q; ``k_scale`` and ``v_scale`` default to 1.0. Only for FP8 operands (a
      ValueError otherwise). Finite and positive (not checked: they are data).
    out_dtype: the output dtype with FP8 q: bfloat16 (default), float16, or float32.
      Otherwise the output has q's dtype, and ``out_dtype`` must be
      None or q's dtype (a TypeError otherwise).
    return_lse: also return the natural-log log-sum-exp of the scaled (softcapped) scores,
      float32 ``[B, Hq, Sq]`` (dense q) or ``[Hq, Tq]`` (packed q).
    backend: ``"auto"``: the jax_fmha kernel of the platform the computation is placed on
      (an error if that platform's kernel is not built); ``"reference"``: the pure-JAX
      implementation in ``jax_fmha.reference`` (same semantics, materializes the scores).

  Edge cases and bad device data (never read or written out of bounds):
    * a query row that sees no key gets output 0 and LSE ``-inf`` (never NaN);
    * packed query rows outside every sequence get 0 and LSE ``-inf``;
    * a sequence whose keys do not fit its storage (a page id outside
      ``[0, num_pages)`` among its first ``seq_lens[b]`` keys, ``seq_lens[b]`` negative or
      larger than the cache or the table can hold, ``cu_seqlens`` outside the arrays) is not
      computed: its output rows and LSE are NaN.

  Forward only: ``jax.grad`` through the kernel raises.

  Returns:
    ``out`` with q's shape and dtype (``out_dtype`` for FP8 q), or ``(out, lse)`` when
    ``return_lse``.
  """
  problem = _validation.attention(
    q,
    k,
    v,
    causal=causal,
    scale=scale,
    window=window,
    softcap=softcap,
    cu_seqlens_q=cu_seqlens_q,
    cu_seqlens_k=cu_seqlens_k,
    max_seqlen_q=max_seqlen_q,
    max_seqlen_k=max_seqlen_k,
    block_table=block_table,
    seq_lens=seq_lens,
    num_splits=num_splits,
    q_scale=q_scale,
    k_scale=k_scale,
    v_scale=v_scale,
    out_dtype=out_dtype,
    backend=backend,
  )
  if backend == "reference":
    out, lse = reference.attention(**problem.operands(), **problem.attributes())
  else:
    out, lse = _run_kernel(problem)
  return (out, lse) if return_lse else out


def _run_kernel(p: AttentionProblem) -> tuple[jax.Array, jax.Array]:
  splits = p.num_splits
  if splits is None:
    splits = _split_plan.num_splits(
      batch=p.batch,
      num_kv_heads=p.k.shape[-2],
      group=p.q.shape[-2] // p.k.shape[-2],
      max_seqlen_q=p.max_seqlen_q,
      max_seqlen_k=p.max_seqlen_k,
      head_dim=p.q.shape[-1],
      page_size=p.k.shape[1] if p.kv_layout == "paged" else 0,
      device=_split_plan.target_device(p.q),
      fp8_kv=_validation.is_fp8(p.k),
      fp8_q=_validation.is_fp8(p.q),
    )
  out, lse = attention_fwd(**p.operands(), **p.attributes(), num_splits=splits)
  if splits == 1:
    return out, lse
  return merge_attention_states(out, lse, out_dtype=p.out_dtype)


# ---------------------------------------------------------------------------------------
# The forward primitive
# ---------------------------------------------------------------------------------------


def _attention_abstract_eval(q, *avals, num_splits, out_dtype, **params):
  # Dense q [B, Sq, Hq, D] -> lse [B, Hq, Sq]; packed q [Tq, Hq, D] -> lse [Hq, Tq].
  lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if q.ndim == 4 else (q.shape[1], q.shape[0])
  if num_splits == 1:
    return (
      jax.ShapeDtypeStruct(q.shape, out_dtype),
      jax.ShapeDtypeStruct(lse_shape, jnp.float32),
    )
  # Split-KV: float32 partial outputs and LSEs, one per split, on a new leading axis.
  splits = (int(num_splits),)
  return (
    jax.ShapeDtypeStruct(splits + q.shape, jnp.float32),
    jax.ShapeDtypeStruct(splits + lse_shape, jnp.float32),
  )


# Each layout's keys and values. Page ids are global: a page pool splits on KV heads only.
_KEYS = {
  "uniform": "batch seq_k kv_heads head_dim",
  "cache": "batch seq_k kv_heads head_dim",
  "paged": "pages page_size kv_heads head_dim",
  "packed": "tokens_k kv_heads head_dim",
}


def _attention_split_rule(q, k, *avals, kv_layout, num_splits, **params) -> SplitRule:
  """Batch and heads split: query heads are (KV head, member of its group), KV head major,
  as the kernel maps them, so a shard of query heads has its own KV heads. Sequences and
  the head dimension are needed whole (splitting them is context parallelism). Absent
  index operands and scales are placeholders (``_``); the FP8 scales ``[B, Hkv]`` split
  with the batch and the KV heads."""
  dense = q.ndim == 4
  heads = "(kv_heads group)"
  queries = f"batch seq_q {heads} head_dim" if dense else f"tokens_q {heads} head_dim"
  lse = f"batch {heads} seq_q" if dense else f"{heads} tokens_q"
  cu_seqlens_q = "_" if dense else "offsets_q"
  cu_seqlens_k = "offsets_k" if kv_layout == "packed" else "_"
  seq_lens = "batch" if kv_layout in ("cache", "paged") else "_"
  block_table = "batch table_pages" if kv_layout == "paged" else "_ _"
  scales = ", ".join(fp8_scale_axes(scale) for scale in avals[-3:])
  splits = "" if num_splits == 1 else "_ "
  return SplitRule(
    f"{queries}, {_KEYS[kv_layout]}, {_KEYS[kv_layout]}, {cu_seqlens_q}, {cu_seqlens_k}, "
    f"{seq_lens}, {block_table}, {scales} -> {splits}{queries}, {splits}{lse}",
    # Packed queries hold every sequence in one axis: nothing splits over the batch.
    shardable={"batch", "kv_heads"} if dense else {"kv_heads"},
    compound_sizes={"group": q.shape[-2] // k.shape[-2]},
  )


def _attention_batching(args, dims, **params):
  q = args[0]
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  dense_q = q.ndim - (dims[0] is not None) == 4
  # Dense queries with dense / cached / paged keys: the vmapped axis folds into the batch
  # (the FP8 scales [B, Hkv] with it). Other forms run once per batch element.
  if dense_q and params["kv_layout"] != "packed":
    q, k, v, seq_lens, table = _fold_dense(args[:7], dims[:7], size, params["kv_layout"])
    scales = [_fold_scale(x, d, size) for x, d in zip(args[7:], dims[7:])]
    out, lse = attention_fwd_p.bind(q, k, v, args[3], args[4], seq_lens, table, *scales, **params)
    lead = 0 if params["num_splits"] == 1 else 1
    out = out.reshape(out.shape[:lead] + (size, -1) + out.shape[lead + 1 :])
    lse = lse.reshape(lse.shape[:lead] + (size, -1) + lse.shape[lead + 1 :])
    return [out, lse], [lead, lead]
  return map_over_batch(attention_fwd_p, args, dims, params)


def _fold_dense(args, dims, size, kv_layout: KvLayout):
  q, k, v, _, _, seq_lens, table = args
  merge = lambda x: x.reshape((-1,) + x.shape[2:])
  q = merge(broadcast_batched([q], dims[:1], size)[0])
  if kv_layout in ("uniform", "cache"):
    k, v = (merge(x) for x in broadcast_batched([k, v], dims[1:3], size))
    if kv_layout == "cache":
      seq_lens = merge(broadcast_batched([seq_lens], dims[5:6], size)[0])
    return q, k, v, seq_lens, table
  # Paged: pages may be shared (unbatched) or per batch element (stacked, ids offset).
  seq_lens, table = (merge(x) for x in broadcast_batched([seq_lens, table], dims[5:7], size))
  if dims[1] is not None or dims[2] is not None:
    k, v = broadcast_batched([k, v], dims[1:3], size)
    num_pages = k.shape[1]
    offsets = jnp.repeat(jnp.arange(size, dtype=jnp.int32) * num_pages, table.shape[0] // size)
    table = table + offsets[:, None]
    k, v = merge(k), merge(v)
  return q, k, v, seq_lens, table


def _fold_scale(scale, dim, size):
  """FP8 scales [B, Hkv] (or batched [size, B, Hkv]) as [size * B, Hkv]; an absent scale's
  placeholder (unbatched) as it is."""
  if dim is None and scale.ndim == 1:
    return scale
  scale = broadcast_batched([scale], [dim], size)[0]
  return scale.reshape((-1,) + scale.shape[2:])


def _attention_platform_check(platform, avals_in, params):
  if platform == "cuda" and _validation.is_fp8(avals_in[0]):
    _fp8_queries_cuda_check(avals_in, params)
  # The CUDA kernel runs on tensor cores: bfloat16 and float16 only.
  if platform == "cuda" and avals_in[0].dtype == jnp.float32:
    raise TypeError(
      "q, k, v: jax_fmha.attention (and attention_with_kvcache) on the GPU expected dtype "
      "bfloat16 or float16, got float32: cast them, e.g. q.astype(jnp.bfloat16) (the "
      "caches too with attention_with_kvcache), or use backend='reference' for float32"
    )


def _fp8_queries_cuda_check(avals_in, params):
  """FP8 queries on the GPU: the Hopper kernel's FP8 Q K^T, with 16-bit P V or (e4m3fn v)
  FP8 P V (docs/design/fp8_attention.md), refused at trace time by the CUDA handler's rules (which
  also check the device)."""
  operands = dict(zip("qkv", avals_in[:3]))
  q, k = operands["q"], operands["k"]
  refusal = _ffi.fp8_query_refusal(
    hopper_kernel=_ffi.hopper_kernel_built(),
    head_dim=q.shape[-1],
    page_size=k.shape[1] if params.get("kv_layout") == "paged" else 0,
    e4m3=jnp.dtype(q.dtype) == jnp.dtype(jnp.float8_e4m3fn),
  )
  if refusal is None:
    return
  argument, reason, dtype = refusal
  x = operands[argument]
  got = f"dtype {x.dtype}" if dtype else f"shape {tuple(x.shape)}"
  raise (TypeError if dtype else ValueError)(
    f"{argument}: {reason}, got {argument} of {got} on the GPU: run on the CPU or with "
    f"backend='reference'"
  )


attention_fwd_p = define_ffi_primitive(
  "jax_fmha_attention_fwd",
  "jax_fmha_attention_fwd",
  _attention_abstract_eval,
  _attention_batching,
  api_name="attention",
  split_rule=_attention_split_rule,
  operand_names=(
    "q",
    "k",
    "v",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "seq_lens",
    "block_table",
    "q_scale",
    "k_scale",
    "v_scale",
  ),
  static_params=("out_dtype",),
  named_params={"kv_layout": "kv_layouts"},
  platform_check=_attention_platform_check,
)


def attention_fwd(
  q,
  k,
  v,
  *,
  cu_seqlens_q=None,
  cu_seqlens_k=None,
  seq_lens=None,
  block_table=None,
  q_scale=None,
  k_scale=None,
  v_scale=None,
  out_dtype=None,
  scale: float,
  softcap: float,
  window: tuple[int, int],
  kv_layout: KvLayout,
  num_splits: int,
  max_seqlen_q: int,
):
  """Binds the attention forward primitive; arguments are already validated (FP8 scales
  float32 [B, Hkv]). ``out_dtype`` defaults to q's dtype."""
  return attention_fwd_p.bind(
    q,
    k,
    v,
    empty_i32() if cu_seqlens_q is None else cu_seqlens_q,
    empty_i32() if cu_seqlens_k is None else cu_seqlens_k,
    empty_i32() if seq_lens is None else seq_lens,
    empty_i32(0, 0) if block_table is None else block_table,
    empty_f32() if q_scale is None else q_scale,
    empty_f32() if k_scale is None else k_scale,
    empty_f32() if v_scale is None else v_scale,
    out_dtype=np.dtype(q.dtype if out_dtype is None else out_dtype),
    scale=np.float32(scale),
    softcap=np.float32(softcap),
    window_left=np.int32(window[0]),
    window_right=np.int32(window[1]),
    kv_layout=kv_layout,
    num_splits=np.int32(num_splits),
    max_seqlen_q=np.int32(max_seqlen_q),
  )
