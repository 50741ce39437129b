"""Greedy decoding of a small Llama-shaped model built from jax_fmha.flax.nnx layers.

The model (random weights: token embedding, pre-norm blocks of GQA attention with rotary
embeddings and a SwiGLU MLP, final RMSNorm, LM head) prefills a batch of prompts of
different lengths into a paged KV cache, then decodes one token per step through
``jax_fmha.attention_with_kvcache``. The same model built from plain Flax layers
(``nnx.LinearGeneral``, ``nnx.dot_product_attention`` over a dense KV cache,
``nnx.RMSNorm``, ``nnx.Linear``) gets the same parameters, loaded unchanged with
``nnx.update``, and must decode the same tokens. Both print their throughput.

Numerics: the default dtype is float32 on the CPU: both models then compute every logit to
float32 rounding, and random weights leave no near ties, so the greedy tokens are equal
(asserted). GPU kernels take bfloat16/float16 only, so on a GPU the default is bfloat16;
there the two models round differently and a near tie may pick a different token, after
which the sequences diverge. The check is then teacher-forced: the Flax model reads the
prompts plus jax_fmha's tokens, and each of those tokens must be its argmax up to a
bfloat16 tolerance.

With ``--cache-dtype float8_e4m3fn`` (or ``float8_e5m2``) jax_fmha's KV cache is FP8, with
scales 1.0 (uncalibrated; docs/design/fp8_kv_cache.md): half the cache bytes each decode
step reads. Its tokens then carry FP8's error, beyond the rounding the check allows: the
run reports how far its tokens are from Flax's choices instead of asserting.

  python examples/llama_decode.py                 # CPU: well under a minute
  python examples/llama_decode.py --dtype bfloat16
  python examples/llama_decode.py --dtype bfloat16 --cache-dtype float8_e4m3fn
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_fmha.flax import apply_rope, nnx as fmha


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 512
  features: int = 256
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 2
  mlp_features: int = 704
  rope_theta: float = 10000.0
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @property
  def head_dim(self) -> int:
    return self.features // self.num_heads


# ---------------------------------------------------------------------------------------
# The decoder blocks: jax_fmha's layers, and the same from plain Flax layers
# ---------------------------------------------------------------------------------------


class FusedBlock(nnx.Module):
  """Pre-norm block from jax_fmha.flax.nnx: paged KV cache, fused residual-add + norm."""

  def __init__(self, config: Config, rngs: nnx.Rngs):
    self.attention_norm = fmha.RMSNorm(
      config.features, epsilon=config.norm_epsilon, dtype=config.dtype, rngs=rngs
    )
    self.attention = fmha.MultiHeadAttention(
      config.num_heads,
      config.features,
      num_kv_heads=config.num_kv_heads,
      use_bias=False,
      causal=True,
      rope_theta=config.rope_theta,
      decode=True,
      dtype=config.dtype,
      rngs=rngs,
    )
    self.mlp_norm = fmha.RMSNorm(
      config.features, epsilon=config.norm_epsilon, dtype=config.dtype, rngs=rngs
    )
    self.mlp = fmha.GatedMLP(config.features, config.mlp_features, dtype=config.dtype, rngs=rngs)

  def __call__(self, x, lengths):
    attended = self.attention(self.attention_norm(x), lengths=lengths)
    normed, x = self.mlp_norm(attended, residual=x)  # x + attended, and its norm
    return x + self.mlp(normed)


class FlaxAttention(nnx.Module):
  """GQA self-attention with rotary embeddings from plain Flax: ``nnx.LinearGeneral``
  projections (the parameters of ``nnx.MultiHeadAttention``) and
  ``nnx.dot_product_attention`` over a dense KV cache ``[batch, max_length, kv_heads,
  head_dim]``, masked by position."""

  def __init__(self, config: Config, rngs: nnx.Rngs):
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    linear = functools.partial(nnx.LinearGeneral, use_bias=False, dtype=config.dtype, rngs=rngs)
    self.query = linear(config.features, (heads, head_dim))
    self.key = linear(config.features, (kv_heads, head_dim))
    self.value = linear(config.features, (kv_heads, head_dim))
    self.out = linear((heads, head_dim), config.features, axis=(-2, -1))
    self.rope_theta, self.dtype = config.rope_theta, config.dtype
    self.cached_key = self.cached_value = self.cache_seqlens = nnx.data(None)

  def init_cache(self, input_shape):
    batch_size, max_length = input_shape[:2]
    kv_shape = (batch_size, max_length) + self.key.kernel.shape[1:]
    self.cached_key = nnx.Cache(jnp.zeros(kv_shape, self.dtype))
    self.cached_value = nnx.Cache(jnp.zeros(kv_shape, self.dtype))
    self.cache_seqlens = nnx.Cache(jnp.zeros((batch_size,), jnp.int32))

  def __call__(self, x, lengths):
    batch, length = x.shape[:2]
    positions = self.cache_seqlens[...][:, None] + jnp.arange(length)  # [batch, length]
    query = apply_rope(self.query(x), positions, self.rope_theta)
    key = apply_rope(self.key(x), positions, self.rope_theta)
    # Padding tokens are written too, past a row's last token: masked out below, and
    # overwritten by the next tokens before any query position reaches them.
    rows = jnp.arange(batch)[:, None]
    self.cached_key[...] = self.cached_key[...].at[rows, positions].set(key, mode="drop")
    self.cached_value[...] = (
      self.cached_value[...].at[rows, positions].set(self.value(x), mode="drop")
    )
    key_positions = jnp.arange(self.cached_key.shape[1])
    mask = key_positions <= positions[:, None, :, None]  # [batch, 1, length, max_length]
    out = nnx.dot_product_attention(query, self.cached_key[...], self.cached_value[...], mask=mask)
    self.cache_seqlens[...] += length if lengths is None else lengths
    return self.out(out)


class FlaxGatedMLP(nnx.Module):
  """SwiGLU from ``nnx.Linear`` and ``jax.nn.silu`` (``GatedMLP``'s parameters)."""

  def __init__(self, features: int, hidden_features: int, dtype, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, rngs=rngs)
    self.gate_proj = linear(features, hidden_features)
    self.up_proj = linear(features, hidden_features)
    self.down_proj = linear(hidden_features, features)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class FlaxBlock(nnx.Module):
  """``FusedBlock`` from plain Flax layers."""

  def __init__(self, config: Config, rngs: nnx.Rngs):
    self.attention_norm = nnx.RMSNorm(
      config.features, epsilon=config.norm_epsilon, dtype=config.dtype, rngs=rngs
    )
    self.attention = FlaxAttention(config, rngs)
    self.mlp_norm = nnx.RMSNorm(
      config.features, epsilon=config.norm_epsilon, dtype=config.dtype, rngs=rngs
    )
    self.mlp = FlaxGatedMLP(config.features, config.mlp_features, config.dtype, rngs)

  def __call__(self, x, lengths):
    x = x + self.attention(self.attention_norm(x), lengths)
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """Token embedding, ``num_layers`` blocks of ``block_type``, final norm, LM head."""

  def __init__(self, config: Config, block_type, norm_type, rngs: nnx.Rngs):
    self.embed = nnx.Embed(config.vocab_size, config.features, dtype=config.dtype, rngs=rngs)
    self.layers = nnx.List([block_type(config, rngs) for _ in range(config.num_layers)])
    self.final_norm = norm_type(
      config.features, epsilon=config.norm_epsilon, dtype=config.dtype, rngs=rngs
    )
    self.lm_head = nnx.Linear(
      config.features, config.vocab_size, use_bias=False, dtype=config.dtype, rngs=rngs
    )

  def init_cache(self, batch_size: int, max_length: int, **cache_options):
    for layer in self.layers:
      layer.attention.init_cache((batch_size, max_length), **cache_options)

  def __call__(self, tokens, lengths=None):
    """Logits ``[batch, length, vocab]`` of ``tokens [batch, length]`` (row b: its first
    ``lengths[b]`` tokens, then padding; None: all), appended to the KV caches."""
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x, lengths)
    return self.lm_head(self.final_norm(x))


def fused_llama(config: Config, rngs: nnx.Rngs) -> Llama:
  return Llama(config, FusedBlock, fmha.RMSNorm, rngs)


def flax_llama(config: Config, rngs: nnx.Rngs) -> Llama:
  return Llama(config, FlaxBlock, nnx.RMSNorm, rngs)


# ---------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Decoded:
  tokens: np.ndarray  # int [batch, steps]
  prefill_seconds: float
  decode_seconds: float  # steps - 1 decode steps (the prefill makes the first token)

  @property
  def decode_tokens_per_second(self) -> float:
    return self.tokens.shape[0] * (self.tokens.shape[1] - 1) / self.decode_seconds


def greedy_decode(
  model: Llama, prompts, lengths, steps: int, place=lambda state: state, **cache_options
) -> Decoded:
  """Prefills right-padded ``prompts [batch, P]`` (``lengths [batch]`` tokens each), then
  decodes ``steps`` tokens per prompt, each the argmax of the last position's logits.
  ``place(state)`` puts the parameters and the KV cache where they run (e.g. split over
  devices); by default they stay on the default device. Prefill and decode step are
  compiled ahead of time and run once untimed, so neither timing holds a compile or a
  first launch."""
  batch = prompts.shape[0]
  model.init_cache(batch, prompts.shape[1] + steps, **cache_options)
  graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
  params, cache = place(params), place(cache)

  def next_tokens(params, cache, tokens, lengths):
    model = nnx.merge(graphdef, params, cache)
    logits = model(tokens, lengths)
    last = tokens.shape[1] - 1 if lengths is None else lengths - 1
    return jnp.argmax(logits[jnp.arange(batch), last], axis=-1), nnx.state(model, nnx.Cache)

  compile_step = jax.jit(next_tokens, donate_argnums=1).lower
  prefill = compile_step(params, cache, prompts, lengths).compile()
  decode_step = compile_step(params, cache, prompts[:, :1], None).compile()
  # One untimed run of each: the first launch of a kernel loads its code onto the GPU.
  warm_token, warm_cache = prefill(params, jax.tree.map(jnp.copy, cache), prompts, lengths)
  jax.block_until_ready(decode_step(params, warm_cache, warm_token[:, None], None))

  start = time.perf_counter()
  token, cache = prefill(params, cache, prompts, lengths)
  tokens = [jax.block_until_ready(token)]
  prefilled = time.perf_counter()
  for _ in range(steps - 1):
    token, cache = decode_step(params, cache, token[:, None], None)
    tokens.append(token)
  tokens = np.stack(jax.device_get(tokens), axis=1)
  return Decoded(tokens, prefilled - start, time.perf_counter() - prefilled)


def teacher_forced_gaps(model: Llama, prompts, lengths, tokens) -> np.ndarray:
  """``(max(logits) - logits[token]) / max|logits|`` of ``model`` at each of ``tokens
  [batch, steps]``, reading each prompt followed by its tokens in one pass: 0 where the
  model would have chosen that token greedily."""
  batch, steps = tokens.shape
  sequences = np.zeros((batch, prompts.shape[1] + steps), np.int32)
  for row, length in enumerate(np.asarray(lengths)):
    sequences[row, :length] = prompts[row, :length]
    sequences[row, length : length + steps] = tokens[row]
  model.init_cache(batch, sequences.shape[1])
  logits = nnx.jit(Llama.__call__)(model, jnp.asarray(sequences), lengths + steps)
  logits = logits.astype(jnp.float32)
  positions = np.asarray(lengths)[:, None] - 1 + np.arange(steps)  # predicting tokens
  logits = logits[np.arange(batch)[:, None], positions]  # [batch, steps, vocab]
  chosen = jnp.take_along_axis(logits, jnp.asarray(tokens)[..., None], axis=-1)[..., 0]
  return np.asarray((logits.max(axis=-1) - chosen) / jnp.abs(logits).max(axis=-1))


def run(
  config: Config,
  prompt_lengths: list[int],
  steps: int,
  page_size: int = 16,
  seed: int = 0,
  cache_dtype=None,
) -> tuple[Decoded, Decoded]:
  """Builds both models with the same parameters, decodes with each and checks the
  tokens (see the module docstring); returns (jax_fmha's, Flax's) results. cache_dtype:
  jax_fmha's KV cache dtype (None: the model's); an FP8 one prints the largest
  teacher-forced gap of jax_fmha's tokens in Flax's logits instead of checking them."""
  fused_model = fused_llama(config, nnx.Rngs(seed))
  # The Flax model is built abstractly (no weights), then gets the fused model's
  # parameters, as it would load a checkpoint: the parameter trees must be the same.
  flax_model = nnx.eval_shape(lambda: flax_llama(config, nnx.Rngs(seed)))
  params = nnx.state(fused_model, nnx.Param)
  shapes = lambda state: jax.tree.map(jnp.shape, nnx.to_pure_dict(state))
  assert shapes(params) == shapes(nnx.state(flax_model, nnx.Param)), "parameter trees differ"
  nnx.update(flax_model, params)

  prompts, lengths = random_prompts(config.vocab_size, prompt_lengths, seed)
  fused = greedy_decode(
    fused_model, prompts, lengths, steps, page_size=page_size, dtype=cache_dtype
  )
  flax = greedy_decode(flax_model, prompts, lengths, steps)
  if cache_dtype is not None and jnp.dtype(cache_dtype).itemsize == 1:
    gaps = teacher_forced_gaps(flax_model, prompts, lengths, fused.tokens)
    print(f"FP8 cache: jax_fmha's tokens are up to {gaps.max():.2%} below Flax's argmax")
    return fused, flax
  assert_same_choices(
    fused.tokens, flax.tokens, flax_model, prompts, lengths, config.dtype, ("jax_fmha", "Flax")
  )
  return fused, flax


def random_prompts(vocab_size: int, prompt_lengths: list[int], seed: int):
  """Random prompts of `prompt_lengths` tokens, right-padded with 0: (prompts, lengths)."""
  lengths = np.asarray(prompt_lengths, np.int32)
  prompts = np.random.default_rng(seed).integers(
    0, vocab_size, (len(lengths), lengths.max()), dtype=np.int32
  )
  prompts[np.arange(lengths.max()) >= lengths[:, None]] = 0  # padding
  return jnp.asarray(prompts), jnp.asarray(lengths)


def assert_same_choices(tokens, reference_tokens, reference_model, prompts, lengths, dtype, names):
  """`tokens` are those `reference_model` chooses greedily (`names`: who chose `tokens`,
  and the reference). In float32 both compute every logit to float32 rounding: `tokens`
  equal the reference's own greedy `reference_tokens`. In lower precision a near tie may
  go either way, after which the sequences diverge: teacher-forced, each of `tokens` must
  be the reference model's argmax up to rounding, reading the prompts and `tokens`."""
  name, reference_name = names
  if jnp.dtype(dtype) == jnp.float32:
    np.testing.assert_array_equal(
      tokens, reference_tokens, err_msg=f"{name} and {reference_name} decoded different tokens"
    )
    return
  gaps = teacher_forced_gaps(reference_model, prompts, lengths, tokens)
  tolerance = 2**-6  # relative: four bfloat16 roundings (8-bit significand)
  assert gaps.max() <= tolerance, (
    f"a token {name} chose is {gaps.max():.2%} (of the largest logit) below the best "
    f"in {reference_name}'s logits"
  )


def argument_parser(description: str) -> argparse.ArgumentParser:
  """The command line of this example (and of those built on it)."""
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(
    description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument(
    "--prompt-lengths",
    type=int,
    nargs="+",
    default=[7, 23, 12, 31],
    metavar="N",
    help="one prompt per length (the batch), right-padded to the longest",
  )
  parser.add_argument("--steps", type=int, default=32, help="tokens decoded per prompt")
  parser.add_argument("--layers", type=int, default=Config.num_layers, help="decoder blocks")
  parser.add_argument(
    "--page-size", type=int, default=16, help="tokens per page of jax_fmha's KV cache"
  )
  parser.add_argument(
    "--dtype",
    choices=["float32", "bfloat16"],
    default="bfloat16" if on_gpu else "float32",
    help="dtype of parameters and activations: bfloat16 on a GPU, else float32",
  )
  return parser


def main():
  parser = argument_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--cache-dtype",
    choices=["model", "float8_e4m3fn", "float8_e5m2"],
    default="model",
    help="dtype of jax_fmha's KV cache: the model's (--dtype), or FP8",
  )
  args = parser.parse_args()
  config = Config(num_layers=args.layers, dtype=jnp.dtype(args.dtype))
  cache_dtype = None if args.cache_dtype == "model" else jnp.dtype(args.cache_dtype)

  print(
    f"{jax.default_backend()}, {args.dtype}: Llama-shaped, {config.num_layers} layers, "
    f"{config.features} features, {config.num_heads} query / {config.num_kv_heads} KV "
    f"heads, vocab {config.vocab_size}, random weights"
  )
  print(f"prompts of {args.prompt_lengths} tokens, {args.steps} tokens decoded greedily each")
  fused, flax = run(
    config, args.prompt_lengths, args.steps, page_size=args.page_size, cache_dtype=cache_dtype
  )
  cache = "" if cache_dtype is None else f" {args.cache_dtype}"
  for name, result in (
    (f"jax_fmha.flax (paged{cache} KV cache, {args.page_size} tokens/page)", fused),
    ("flax (dense KV cache)", flax),
  ):
    print(
      f"  {name:45s} prefill {result.prefill_seconds * 1e3:7.1f} ms   decode "
      f"{result.decode_tokens_per_second:8.0f} tokens/s"
    )
  if cache_dtype is not None:
    check = "none (FP8 cache: see the gap above)"
  elif config.dtype == jnp.float32:
    check = "identical tokens"
  else:
    check = "each of jax_fmha's tokens is Flax's argmax up to bfloat16 rounding"
  print(f"check: {check}; first prompt's tokens: {fused.tokens[0, :12].tolist()} ...")


if __name__ == "__main__":
  main()
