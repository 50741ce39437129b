"""flax.linen layers computed by jax_fmha's kernels, with Flax's parameter trees.

* ``make_attention_fn``: an ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention``.
* ``MultiHeadDotProductAttention`` / ``MultiHeadAttention``: drop-ins for Flax's, plus GQA
  (``num_kv_heads``), rotary embeddings (``rope_theta``), ``causal``/``window`` masks,
  right-padded rows (``lengths``) and a paged KV cache for decoding (``decode=True``).
* ``RMSNorm`` (Flax's ``scale`` parameter) and ``GatedMLP`` (SwiGLU / GeGLU).

Forward only (the kernels have no gradient).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer, PrecisionLike
from jax.typing import ArrayLike

from jax_fmha.flax._common import (
  GatedActivation,
  PagedKVCache,
  attend,
  attention_inputs,
  check_gated_activation,
  gated_activation,
  make_attention_fn,
  rms_norm,
)

__all__ = [
  "GatedMLP",
  "MultiHeadAttention",
  "MultiHeadDotProductAttention",
  "RMSNorm",
  "make_attention_fn",
]


class MultiHeadDotProductAttention(nn.Module):
  """``flax.linen.MultiHeadDotProductAttention`` computed by ``jax_fmha.attention``.

  Parameters are Flax's: ``query``/``key``/``value`` ``DenseGeneral`` kernels
  ``[features, heads, head_dim]`` (biases ``[heads, head_dim]``), ``out`` kernel
  ``[heads, head_dim, out_features]``, and ``query_ln``/``key_ln`` with ``normalize_qk``;
  only ``key``/``value`` have ``num_kv_heads`` heads where that differs from ``num_heads``.
  A checkpoint of Flax's layer loads unchanged (with ``num_kv_heads`` unset).

  Attributes beyond Flax's:
    num_kv_heads: key/value heads (grouped-query attention); default ``num_heads``.
    causal: causal mask, bottom-right aligned (query ``i`` of ``Sq`` sees keys
      ``j <= i + Sk - Sq``). This replaces Flax's ``mask=make_causal_mask(...)``.
    window: ``(left, right)`` sliding window around that diagonal; -1 is unbounded.
    rope_theta: rotary position embeddings (``apply_rope``) of queries and keys with this
      base, at each token's position (index in its row plus tokens already cached); None
      for none.
    page_size: tokens per page of the decode cache.
    cache_dtype: dtype of the decode cache: None for the keys' (compute) dtype; another
      float dtype casts queries, keys and values to it for the cached attention; an FP8
      dtype (``jnp.float8_e4m3fn``, ``jnp.float8_e5m2``) stores the keys and values
      quantized, with float32 per-KV-head scales in the cache variables ``key_scale`` and
      ``value_scale``, 1.0 unless replaced before the first cached call (see
      ``PagedKVCache``).

  ``decode=True``: as in Flax, the first call (``init``) sizes the cache from its inputs
  ``[batch, max_length, features]`` (attending over them without caching them); later
  calls (``apply(..., mutable=["cache"])``) take self-attention inputs ``[batch, length,
  features]``, append their keys and values to the paged cache and attend over everything
  cached so far: prefill a prompt, then decode one token per call. A call with more
  tokens than the cache holds (inputs longer than ``max_length`` rounded up to whole
  pages; with ``lengths`` only the device knows the count) raises a ValueError at trace
  time. Only the device knows how many tokens are cached, so a
  sequence that outgrows the cache over several calls (a prefill, then too many decode
  steps) is not caught: as ``jax_fmha.update_kv_cache`` and ``jax_fmha.attention``
  document, the writes past capacity are dropped and that sequence's outputs are NaN from
  then on (the other sequences are unaffected). The collection
  ``cache`` holds ``PagedKVCache``'s fields: ``key_pages``, ``value_pages``,
  ``block_table`` and ``seq_lens``, and ``key_scale``/``value_scale`` for an FP8 cache.

  Not supported (a ValueError says so): ``mask`` (use ``causal``/``window``/``lengths``),
  attention dropout when not deterministic, ``sow_weights``.
  """

  num_heads: int
  num_kv_heads: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  qkv_features: int | None = None
  out_features: int | None = None
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: PrecisionLike = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  out_kernel_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros_init()
  out_bias_init: Initializer | None = None
  use_bias: bool = True
  decode: bool = False
  normalize_qk: bool = False
  causal: bool = False
  window: tuple[int, int] = (-1, -1)
  rope_theta: float | None = None
  page_size: int = 16
  cache_dtype: Dtype | None = None

  @nn.compact
  def __call__(
    self,
    inputs_q: jax.Array,
    inputs_k: jax.Array | None = None,
    inputs_v: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    deterministic: bool | None = None,
    dropout_rng: jax.Array | None = None,
    sow_weights: bool = False,
    lengths: ArrayLike | None = None,
  ) -> jax.Array:
    """Attention of ``inputs_q [batch..., Sq, features]`` over ``inputs_k``/``inputs_v``
    (default: ``inputs_q``, self-attention).

    ``lengths`` (int ``[batch...]``, self-attention only): row b holds ``lengths[b]``
    tokens, then padding, which is neither attended nor cached. ``dropout_rng`` is accepted
    for Flax's signature; there is no dropout to seed.
    """
    del dropout_rng
    inputs_k, inputs_v = attention_inputs(
      inputs_q,
      inputs_k,
      inputs_v,
      mask=mask,
      sow_weights=sow_weights,
      dropout_rate=self.dropout_rate,
      deterministic=self.deterministic if deterministic is None else deterministic,
    )

    num_kv_heads = self.num_kv_heads or self.num_heads
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads or self.num_heads % num_kv_heads:
      raise ValueError(
        f"qkv_features ({qkv_features}) must be a multiple of num_heads "
        f"({self.num_heads}), and num_heads of num_kv_heads ({num_kv_heads})"
      )
    head_dim = qkv_features // self.num_heads
    projection = functools.partial(
      nn.DenseGeneral,
      axis=-1,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      use_bias=self.use_bias,
      precision=self.precision,
    )
    query = projection(features=(self.num_heads, head_dim), name="query")(inputs_q)
    key = projection(features=(num_kv_heads, head_dim), name="key")(inputs_k)
    value = projection(features=(num_kv_heads, head_dim), name="value")(inputs_v)
    if self.normalize_qk:
      qk_norm = functools.partial(
        nn.LayerNorm, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
      )
      query = qk_norm(name="query_ln")(query)
      key = qk_norm(name="key_ln")(key)

    mask_and_positions = dict(
      causal=self.causal, window=self.window, lengths=lengths, rope_theta=self.rope_theta
    )
    if self.decode:
      out = self._attend_with_cache(query, key, value, **mask_and_positions)
    else:
      out, _ = attend(query, key, value, **mask_and_positions)
    return nn.DenseGeneral(
      features=self.out_features or inputs_q.shape[-1],
      axis=(-2, -1),
      kernel_init=self.out_kernel_init or self.kernel_init,
      bias_init=self.out_bias_init or self.bias_init,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      name="out",
    )(out)

  def _attend_with_cache(self, query, key, value, **mask_and_positions):
    if not self.has_variable("cache", "key_pages"):
      if key.ndim != 4:
        raise ValueError(
          f"decode=True: inputs must be [batch, max_length, features] (one "
          f"batch axis), got keys of shape {key.shape[:-2]} + heads"
        )
      empty = PagedKVCache.empty(
        batch_size=key.shape[0],
        max_length=key.shape[1],
        num_kv_heads=key.shape[2],
        head_dim=key.shape[3],
        dtype=self.cache_dtype or key.dtype,
        page_size=self.page_size,
      )
      for name, initial_value in empty.variables().items():
        self.put_variable("cache", name, initial_value)
      out, _ = attend(query, key, value, **mask_and_positions)
      return out
    cache = PagedKVCache(
      **{name: self.get_variable("cache", name) for name in PagedKVCache._fields}
    )
    cache.check_fits(
      key.shape[-3],
      mask_and_positions["lengths"],
      enlarge="size the cache by initializing the layer (init) on inputs "
      "[batch, max_length, features]",
    )
    out, cache = attend(query, key, value, cache=cache, **mask_and_positions)
    for name, updated in cache.variables().items():
      self.put_variable("cache", name, updated)
    return out


class MultiHeadAttention(MultiHeadDotProductAttention):
  """``MultiHeadDotProductAttention`` under the name of Flax's alias (automatic module
  names, hence parameter paths, follow the class name: ``MultiHeadAttention_0``)."""


class RMSNorm(nn.Module):
  """``flax.linen.RMSNorm`` (normalizing the last axis) computed by ``jax_fmha.rms_norm``.

  Parameter ``scale [features]``, as Flax's. ``__call__(x, residual=None)``: with a
  ``residual``, returns ``(rms_norm(x + residual), x + residual)`` from one fused kernel
  (``jax_fmha.rms_norm_residual``), for pre-norm residual blocks.
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(
    self, x: jax.Array, residual: jax.Array | None = None
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    scale = (
      self.param("scale", self.scale_init, (x.shape[-1],), self.param_dtype)
      if self.use_scale
      else None
    )
    return rms_norm(x, scale, epsilon=self.epsilon, dtype=self.dtype, residual=residual)


class GatedMLP(nn.Module):
  """``down_proj(act(gate_proj(x)) * up_proj(x))``: the Llama/Gemma feed-forward block,
  with the activation and product fused by ``jax_fmha.swiglu`` / ``jax_fmha.geglu``.

  Parameters: ``gate_proj``, ``up_proj`` (``Dense``, ``[features, hidden_features]``) and
  ``down_proj`` (``[hidden_features, out_features]``).

  Attributes:
    hidden_features: width of the gated hidden layer.
    out_features: output width (default: the input's).
    activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU).
    approximate_gelu: GeGLU's tanh approximation (as ``jax.nn.gelu``'s default).
  """

  hidden_features: int
  out_features: int | None = None
  activation: GatedActivation = "silu"
  approximate_gelu: bool = True
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_gated_activation(self.activation)
    dense = functools.partial(
      nn.Dense,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
    )
    gate = dense(self.hidden_features, name="gate_proj")(x)
    up = dense(self.hidden_features, name="up_proj")(x)
    hidden = gated_activation(
      gate, up, activation=self.activation, approximate_gelu=self.approximate_gelu
    )
    return dense(self.out_features or x.shape[-1], name="down_proj")(hidden)
