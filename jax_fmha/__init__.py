"""jax_fmha: fused attention and MLP kernels for JAX, as XLA FFI custom calls."""

from jax_fmha import reference
from jax_fmha._ffi import build_info
from jax_fmha.attention import attention

__version__ = "0.1.0"

__all__ = ["attention", "build_info", "reference", "__version__"]
