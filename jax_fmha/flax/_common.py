"""The math behind jax_fmha.flax.linen and jax_fmha.flax.nnx, shared by both.

The layers only declare parameters (Flax's own projection and norm layers, so parameter
trees are Flax's) and hold the cache; everything they compute is here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

import jax_fmha
from jax_fmha import _validation
from jax_fmha.flax._rope import apply_rope

_KERNEL_MASKS = (
  "jax_fmha's fused attention takes no dense mask or bias: it supports causal masking "
  "(make_attention_fn(causal=True), or causal=True on jax_fmha.flax's "
  "MultiHeadAttention), sliding windows (window=(left, right)) and right-padded rows "
  "(lengths=[B] on jax_fmha.flax's MultiHeadAttention). Flax's own decode=True cache "
  "always builds a mask: use jax_fmha.flax's MultiHeadAttention(decode=True), which "
  "keeps a paged KV cache. For any other mask keep Flax's dot_product_attention."
)


def check_no_mask(mask, bias=None):
  """Raises for a dense mask or bias, which the kernel cannot apply (never ignores one)."""
  for name, value in (("mask", mask), ("bias", bias)):
    if value is not None:
      raise ValueError(
        f"{name}: got an array of shape {getattr(value, 'shape', '?')}. " + _KERNEL_MASKS
      )


def check_no_dropout(dropout_rate: float, deterministic: bool | None):
  """Raises where attention dropout would run: the kernel never forms the weights."""
  if dropout_rate > 0.0 and not deterministic:
    raise ValueError(
      f"dropout_rate={dropout_rate} with deterministic={deterministic}: jax_fmha's fused "
      "attention has no attention dropout (it never forms the attention weights) and is "
      "forward-only. Pass deterministic=True (inference), set dropout_rate=0.0, or train "
      "with Flax's dot_product_attention."
    )


def check_no_sow(sow_weights: bool):
  if sow_weights:
    raise ValueError(
      "sow_weights=True: jax_fmha's fused attention never forms the "
      "attention weights, so there are none to sow. Use Flax's "
      "dot_product_attention to inspect them."
    )


def attention_inputs(
  inputs_q,
  inputs_k,
  inputs_v,
  *,
  mask,
  sow_weights: bool,
  dropout_rate: float,
  deterministic: bool | None,
):
  """What both MultiHeadAttention layers check and default on a call: raises for a mask,
  sown weights or dropout (the kernel can do none of them), and returns (inputs_k,
  inputs_v), each defaulting to the one before it (self-attention)."""
  check_no_mask(mask)
  check_no_sow(sow_weights)
  check_no_dropout(dropout_rate, deterministic)
  inputs_k = inputs_q if inputs_k is None else inputs_k
  return inputs_k, inputs_k if inputs_v is None else inputs_v


def resolve_causal(causal: bool, is_causal: bool, query_length: int, key_length: int) -> bool:
  """Combines a layer's ``causal`` with Flax's per-call ``is_causal`` (flax.nnx).

  Flax's ``is_causal`` aligns the mask top-left (query ``i`` sees keys ``j <= i``), the
  kernel bottom-right (``j <= i + Sk - Sq``); they agree when ``Sq == Sk``.
  """
  if is_causal and query_length != key_length:
    raise ValueError(
      f"is_causal=True with {query_length} queries and {key_length} keys: Flax aligns "
      "that mask top-left, jax_fmha's kernel bottom-right (the last query sees every "
      "key); they agree only for equal lengths. Use causal=True on the layer (or in "
      "make_attention_fn) for the bottom-right mask."
    )
  return bool(causal or is_causal)


def make_attention_fn(
  *, causal: bool = False, window: tuple[int, int] = (-1, -1)
) -> Callable[..., jax.Array]:
  """An ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` and
  ``flax.nnx.MultiHeadAttention``, computed by ``jax_fmha.attention``.

  Args:
    causal: causal masking, aligned bottom-right (query ``i`` of ``Sq`` sees keys
      ``j <= i + Sk - Sq``; the usual mask when ``Sq == Sk``).
    window: ``(left, right)`` sliding window around that diagonal; ``-1`` is unbounded.

  The function takes Flax's arguments: ``query [batch..., Sq, H, D]``,
  ``key``/``value [batch..., Sk, Hkv, D]`` (``H`` a multiple of ``Hkv``: GQA), and Flax's
  keywords. It raises a ValueError for what the kernel cannot do, rather than ignoring it:
  a ``mask`` or ``bias`` (use ``causal``/``window`` here instead of a causal mask),
  attention dropout (``dropout_rate > 0`` and not ``deterministic``), ``sow_weights``,
  custom einsums, and flax.nnx's ``is_causal`` with ``Sq != Sk``. ``precision`` and
  ``force_fp32_for_softmax`` change nothing: the kernel always keeps float32 softmax
  statistics and accumulators. Forward only.
  """
  window = tuple(window)

  def attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout=True,
    dropout_rng=None,
    dropout_rate=0.0,
    deterministic=False,
    dtype=None,
    precision=None,
    module=None,
    is_causal=False,
    force_fp32_for_softmax=False,
    qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None,
  ):
    # Flax hands these to every attention_fn; with no dropout and float32 statistics they
    # have no effect on the kernel (dropout itself is refused below).
    del broadcast_dropout, dropout_rng, precision, force_fp32_for_softmax
    check_no_mask(mask, bias)
    check_no_dropout(dropout_rate, deterministic)
    check_no_sow(module is not None)
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise ValueError(
        "qk_attn_weights_einsum / attn_weights_value_einsum: jax_fmha's "
        "fused attention has no einsums to replace (e.g. for quantization); "
        "use Flax's dot_product_attention with them."
      )
    dtype = dtype or jnp.result_type(query, key, value)
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    layer_causal = resolve_causal(causal, is_causal, query.shape[-3], key.shape[-3])
    out, _ = attend(query, key, value, causal=layer_causal, window=window)
    return out

  return attention_fn


class PagedKVCache(NamedTuple):
  """One attention layer's paged KV cache (the operands of ``attention_with_kvcache``).

  ``key_pages``/``value_pages [num_pages, page_size, Hkv, D]``; ``block_table`` int32
  ``[B, pages_per_seq]`` (sequence b's logical page p is physical page
  ``block_table[b, p]``); ``seq_lens`` int32 ``[B]``, the tokens cached per sequence.

  FP8 pages (``float8_e4m3fn``, ``float8_e5m2``) hold keys and values quantized with the
  float32 ``[Hkv]`` scales ``key_scale``/``value_scale`` (``jax_fmha.update_kv_cache``;
  None for other dtypes). ``empty`` makes them 1.0, the usual choice without calibration:
  e4m3fn then keeps 3 significant bits from 2^-6 to 448 (e5m2: 2 bits, 2^-14 to 57344),
  a range that holds ordinary keys and values; larger magnitudes saturate. Calibrated
  scales (e.g. ``jax_fmha.quantize_kv``'s of a representative prompt's keys and values)
  replace them before the first cached token: tokens are quantized with the scales in
  force when they are appended, and attended with the current ones.
  """

  key_pages: jnp.ndarray
  value_pages: jnp.ndarray
  block_table: jnp.ndarray
  seq_lens: jnp.ndarray
  key_scale: jnp.ndarray | None = None
  value_scale: jnp.ndarray | None = None

  @classmethod
  def empty(
    cls,
    *,
    batch_size: int,
    max_length: int,
    num_kv_heads: int,
    head_dim: int,
    dtype,
    page_size: int,
  ) -> PagedKVCache:
    """Room for ``max_length`` tokens per sequence; sequence b owns pages
    ``[b * pages_per_seq, (b + 1) * pages_per_seq)`` (a serving engine would hand pages out
    on demand instead, by rewriting ``block_table``). An FP8 ``dtype`` makes a quantized
    cache with scales 1.0."""
    if page_size < 1 or max_length < 1:
      raise ValueError(f"page_size and max_length must be >= 1, got {page_size} and {max_length}")
    pages_per_seq = -(-max_length // page_size)
    num_pages = batch_size * pages_per_seq
    pages_shape = (num_pages, page_size, num_kv_heads, head_dim)
    quantized = jnp.dtype(dtype) in _validation.FP8_DTYPES
    scale = lambda: jnp.ones((num_kv_heads,), jnp.float32) if quantized else None
    # Two buffers each, not one shared: the caches are donated for an in-place update.
    return cls(
      key_pages=jnp.zeros(pages_shape, dtype),
      value_pages=jnp.zeros(pages_shape, dtype),
      block_table=jnp.arange(num_pages, dtype=jnp.int32).reshape(batch_size, -1),
      seq_lens=jnp.zeros((batch_size,), jnp.int32),
      key_scale=scale(),
      value_scale=scale(),
    )

  @property
  def quantized(self) -> bool:
    """Whether the pages are FP8 (with key_scale and value_scale)."""
    return self.key_scale is not None

  def variables(self) -> dict:
    """The fields a layer keeps as cache variables: every one but absent scales."""
    return {name: value for name, value in self._asdict().items() if value is not None}

  @property
  def capacity(self) -> int:
    """Tokens each sequence's pages hold (``max_length`` rounded up to whole pages)."""
    return self.block_table.shape[1] * self.key_pages.shape[1]

  def check_fits(self, new_tokens: int, lengths, *, enlarge: str) -> None:
    """Raises for a call whose ``new_tokens`` per sequence exceed the capacity: they
    overflow whatever is cached, which shapes tell at trace time. With ``lengths`` the
    static length is only a bound on the tokens cached, so nothing is known to overflow."""
    if lengths is None and new_tokens > self.capacity:
      raise ValueError(
        f"decode=True: the inputs hold {new_tokens} tokens per sequence, more than the KV "
        f"cache's capacity of {self.capacity} tokens per sequence "
        f"(max_length rounded up to whole pages of {self.key_pages.shape[1]}); {enlarge} with "
        f"max_length >= {new_tokens} (plus the tokens to decode after this call)"
      )


@dataclasses.dataclass(frozen=True)
class _RightPaddedRows:
  """A batch ``[B, S, ...]`` whose row b holds ``lengths[b]`` tokens, then padding, in the
  kernel's packed (variable-length) form ``[B * S, ...]``: sequence b at packed rows
  ``cu_seqlens[b]:cu_seqlens[b + 1]``, the spare rows at the end (outside every sequence,
  so the kernel neither attends over them nor caches them)."""

  lengths: jnp.ndarray  # int32 [B], each in [0, S]
  cu_seqlens: jnp.ndarray  # int32 [B + 1]

  @classmethod
  def of(cls, lengths, max_length: int) -> _RightPaddedRows:
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, max_length)
    cu_seqlens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths, dtype=jnp.int32)])
    return cls(lengths=lengths, cu_seqlens=cu_seqlens)

  def pack(self, x):
    batch, length = x.shape[:2]
    row = jnp.arange(batch * length)
    sequence = jnp.clip(jnp.searchsorted(self.cu_seqlens[1:], row, side="right"), 0, batch - 1)
    position = jnp.clip(row - self.cu_seqlens[sequence], 0, length - 1)
    return x[sequence, position]

  def unpack(self, packed, length: int):
    """The inverse of ``pack``; padding positions get 0."""
    position = jnp.arange(length)
    row = jnp.clip(self.cu_seqlens[:-1, None] + position, 0, packed.shape[0] - 1)
    valid = position < self.lengths[:, None]  # [B, S]
    gathered = packed[row]
    return jnp.where(valid.reshape(valid.shape + (1,) * (gathered.ndim - 2)), gathered, 0)


def attend(
  query,
  key,
  value,
  *,
  causal: bool,
  window=(-1, -1),
  lengths=None,
  rope_theta: float | None = None,
  cache: PagedKVCache | None = None,
):
  """Multi-head attention over projected heads, through jax_fmha's kernels.

  Args:
    query: ``[batch..., Sq, H, D]``; key, value: ``[batch..., Sk, Hkv, D]``, one dtype.
    causal, window: the kernel's mask (bottom-right aligned).
    lengths: int ``[batch...]`` or None: row b of a self-attention batch holds
      ``lengths[b]`` tokens followed by padding, which is neither attended nor cached; the
      output is 0 there.
    rope_theta: rotary position embeddings of query and key with this base, or None. A
      token's position is its index in the row, plus the tokens already cached.
    cache: a paged KV cache (decoding: one batch axis): the new keys and values are
      appended to it and attended with it (``attention_with_kvcache``), quantized into
      FP8 pages with the cache's scales; with pages of another float dtype than the
      inputs', queries, keys and values are cast to it (the output back). A sequence
      whose tokens outgrow ``cache.capacity`` (callers check what the shapes tell with
      ``PagedKVCache.check_fits``) follows ``jax_fmha.update_kv_cache`` and
      ``jax_fmha.attention``: the writes past capacity are dropped and its output rows
      are NaN, on that call and every later one.

  Returns:
    ``(out [batch..., Sq, H, D], cache)``: the cache with the new tokens (None without).
  """
  batch_shape, query_length, key_length = query.shape[:-3], query.shape[-3], key.shape[-3]
  if cache is not None and len(batch_shape) != 1:
    raise ValueError(
      f"decoding with a KV cache takes inputs [batch, length, features] "
      f"(one batch axis), got queries of shape {query.shape[:-2]}"
    )
  if lengths is not None and query_length != key_length:
    raise ValueError(
      f"lengths: only for self-attention, got {query_length} queries and {key_length} keys per row"
    )
  query, key, value = (x.reshape((-1,) + x.shape[-3:]) for x in (query, key, value))
  batch = query.shape[0]

  if rope_theta is not None:
    start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.seq_lens
    query = apply_rope(query, start[:, None] + jnp.arange(query_length), rope_theta)
    key = apply_rope(key, start[:, None] + jnp.arange(key_length), rope_theta)

  packed_kwargs = {}
  if lengths is not None:
    rows = _RightPaddedRows.of(jnp.reshape(lengths, (batch,)), query_length)
    query, key, value = rows.pack(query), rows.pack(key), rows.pack(value)
    packed_kwargs = dict(cu_seqlens_q=rows.cu_seqlens, max_seqlen_q=query_length)

  if cache is None:
    if lengths is not None:
      packed_kwargs.update(cu_seqlens_k=rows.cu_seqlens, max_seqlen_k=key_length)
    out = jax_fmha.attention(query, key, value, causal=causal, window=window, **packed_kwargs)
  else:
    out_dtype = query.dtype
    if not cache.quantized:
      query, key, value = (x.astype(cache.key_pages.dtype) for x in (query, key, value))
    out, key_pages, value_pages = jax_fmha.attention_with_kvcache(
      query,
      cache.key_pages,
      cache.value_pages,
      key,
      value,
      cache_seqlens=cache.seq_lens,
      block_table=cache.block_table,
      causal=causal,
      window=window,
      k_scale=cache.key_scale,
      v_scale=cache.value_scale,
      **packed_kwargs,
    )
    out = out.astype(out_dtype)
    new_tokens = query_length if lengths is None else rows.lengths
    cache = cache._replace(
      key_pages=key_pages, value_pages=value_pages, seq_lens=cache.seq_lens + new_tokens
    )

  if lengths is not None:
    out = rows.unpack(out, query_length)
  return out.reshape(batch_shape + out.shape[1:]), cache


def rms_norm(x, scale, *, epsilon: float, dtype=None, residual=None):
  """Flax's RMSNorm arithmetic through ``jax_fmha.rms_norm`` (``rms_norm_residual`` when a
  ``residual`` is given: then returns ``(norm(x + residual), x + residual)``).

  As in Flax, inputs and ``scale`` are promoted to ``dtype`` (default: their common type),
  which is the output's dtype. ``scale`` None means no learned scale.
  """
  dtype = dtype or jnp.result_type(x, *(() if scale is None else (scale,)))
  x = x.astype(dtype)
  weight = jnp.ones(x.shape[-1:], dtype) if scale is None else scale.astype(dtype)
  if residual is None:
    return jax_fmha.rms_norm(x, weight, eps=epsilon)
  return jax_fmha.rms_norm_residual(x, residual.astype(dtype), weight, eps=epsilon)


GatedActivation = Literal["silu", "gelu"]
GATED_ACTIVATIONS: tuple[str, ...] = get_args(GatedActivation)


def check_gated_activation(activation: GatedActivation):
  if activation not in GATED_ACTIVATIONS:
    raise ValueError(
      f"activation: expected one of {GATED_ACTIVATIONS} (SwiGLU, GeGLU), got {activation!r}"
    )


def gated_activation(gate, up, *, activation: GatedActivation, approximate_gelu: bool):
  """``act(gate) * up`` by jax_fmha's fused GLU kernels: SwiGLU or GeGLU."""
  if activation == "silu":
    return jax_fmha.swiglu(gate, up)
  return jax_fmha.geglu(gate, up, approximate=approximate_gelu)
