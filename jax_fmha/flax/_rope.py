"""Rotary position embeddings (RoPE), in the "rotate half" layout of Llama checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def apply_rope(x: jax.Array, positions: ArrayLike, theta: float = 10000.0) -> jax.Array:
  """Rotates each head vector of ``x`` by angles proportional to its token's position.

  The head dimension ``D`` is split into halves ``(x1, x2)``; pair ``i`` (``x1[i]``,
  ``x2[i]``) is rotated by ``position * theta ** (-2 i / D)``. This is the layout of
  Llama-family checkpoints in the Hugging Face format (GPT-NeoX style), not the
  interleaved pairs ``(x[2i], x[2i+1])`` of GPT-J.

  Args:
    x: ``[batch..., length, heads, D]``, ``D`` even.
    positions: integer ``[batch..., length]`` (or broadcastable to it): each token's
      position in its sequence.
    theta: the base of the wavelengths (Llama 2: 10000, Llama 3: 500000).

  Returns:
    ``x``'s shape and dtype; the rotation is computed in float32.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"apply_rope: the head dimension must be even, got shape {x.shape}")
  half = head_dim // 2
  inverse_wavelengths = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inverse_wavelengths
  cos = jnp.cos(angles)[..., None, :]  # [batch..., length, 1 (heads), D/2]
  sin = jnp.sin(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
