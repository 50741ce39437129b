"""Tensor-parallel greedy decoding: llama_decode.py's model with its heads split over devices.

Every local device holds 1/N of each layer's attention heads (the query, key, value and
output projections split on their heads axis), the matching 1/N of the paged KV cache
(split on its KV-heads axis) and 1/N of the MLP's hidden units (gate and up columns, down
rows): Megatron-style tensor parallelism. Norms, embedding and LM head are replicated.
``jax.jit`` partitions the program from the shardings of parameters and cache: each
jax_fmha kernel runs on its device's heads or hidden units (docs/design/sharding.md), the
cache is updated in place on each device, and XLA sums the output and down projections
over the devices. The same model, with the same parameters, also decodes on one device;
the two must choose the same tokens (float32: identical; bfloat16: teacher-forced, each
token the one-device model's argmax up to rounding, as in llama_decode.py).

The model is sized to split evenly: 2 KV heads, or one per device when there are more
devices (8 query heads per 2 KV heads, head dimension 32, MLP 2.75x wider than the model).
It runs on the devices of one host; docs/design/sharding.md says what changes on several.

  python examples/tensor_parallel_decode.py       # every GPU (or the CPU)
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
    python examples/tensor_parallel_decode.py     # 4 virtual CPU devices
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import llama_decode  # this folder's: the model, the decoding loop and the check
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The axis of each parameter (and cache) split over the devices, by the end of its path.
SPLIT_AXIS = {
  ("query", "kernel"): 1,  # [features, heads, head_dim]
  ("key", "kernel"): 1,  # [features, kv_heads, head_dim]
  ("value", "kernel"): 1,
  ("out", "kernel"): 0,  # [heads, head_dim, features]
  ("gate_proj", "kernel"): 1,  # [features, hidden]
  ("up_proj", "kernel"): 1,
  ("down_proj", "kernel"): 0,  # [hidden, features]
  ("key_pages",): 2,  # [pages, page_size, kv_heads, head_dim]
  ("value_pages",): 2,
}


def config_for(devices: int, **options) -> llama_decode.Config:
  """llama_decode's model widened so that its KV heads (at least 2) split evenly."""
  kv_heads = devices * -(-2 // devices)
  return llama_decode.Config(
    features=128 * kv_heads,
    num_heads=4 * kv_heads,
    num_kv_heads=kv_heads,
    mlp_features=352 * kv_heads,
    **options,
  )


def split_over(mesh: Mesh):
  """Places a parameter or cache state on `mesh`: SPLIT_AXIS entries split over its
  ``"model"`` axis, everything else replicated."""

  def place(path, x):
    names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    axis = next((a for end, a in SPLIT_AXIS.items() if names[-len(end) :] == end), None)
    spec = P(*("model" if i == axis else None for i in range(x.ndim)))
    return jax.device_put(x, NamedSharding(mesh, spec))

  return lambda state: jax.tree_util.tree_map_with_path(place, state)


def run(
  config: llama_decode.Config,
  prompt_lengths: list[int],
  steps: int,
  page_size: int = 16,
  seed: int = 0,
  devices=None,
) -> tuple[llama_decode.Decoded, llama_decode.Decoded]:
  """Decodes with the model split over `devices` (default: all) and on one device, checks
  that both choose the same tokens; returns (split, one device) results."""
  devices = jax.devices() if devices is None else devices
  mesh = Mesh(np.array(devices), ("model",))
  model = llama_decode.fused_llama(config, nnx.Rngs(seed))
  prompts, lengths = llama_decode.random_prompts(config.vocab_size, prompt_lengths, seed)
  one = llama_decode.greedy_decode(model, prompts, lengths, steps, page_size=page_size)
  split = llama_decode.greedy_decode(
    model, prompts, lengths, steps, place=split_over(mesh), page_size=page_size
  )
  llama_decode.assert_same_choices(
    split.tokens,
    one.tokens,
    model,
    prompts,
    lengths,
    config.dtype,
    (f"the model split over {len(devices)} devices", "one device"),
  )
  return split, one


def main():
  args = llama_decode.argument_parser(__doc__.splitlines()[0]).parse_args()
  devices = jax.devices()
  config = config_for(len(devices), num_layers=args.layers, dtype=jnp.dtype(args.dtype))
  print(
    f"{len(devices)} x {devices[0].device_kind}, {args.dtype}: Llama-shaped, "
    f"{config.num_layers} layers, {config.features} features, {config.num_heads} query / "
    f"{config.num_kv_heads} KV heads ({config.num_kv_heads // len(devices)} per device), "
    f"vocab {config.vocab_size}, random weights"
  )
  print(f"prompts of {args.prompt_lengths} tokens, {args.steps} tokens decoded greedily each")
  split, one = run(config, args.prompt_lengths, args.steps, page_size=args.page_size)
  split_name = f"heads split over {len(devices)} device{'s' * (len(devices) > 1)}"
  for name, result in ((split_name, split), ("one device", one)):
    print(
      f"  {name:32s} prefill {result.prefill_seconds * 1e3:7.1f} ms   decode "
      f"{result.decode_tokens_per_second:8.0f} tokens/s"
    )
  check = (
    "identical tokens"
    if config.dtype == jnp.float32
    else "each split-model token is the one-device model's argmax up to bfloat16 rounding"
  )
  print(f"check: {check}; first prompt's tokens: {split.tokens[0, :12].tolist()} ...")


if __name__ == "__main__":
  main()
