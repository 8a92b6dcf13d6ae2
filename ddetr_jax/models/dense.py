"""`Dense`: a drop-in for flax's `nn.Dense` whose matmul is `models.matmul.matmul` on a 2-D view.

Same parameters ("kernel" (C_in, features), "bias" (features,), float32), same default
initialisers and names, so checkpoints and the official / HF key mappings are unchanged.

Why not `nn.Dense`:
- It contracts the last axis of a [..., C_in] input directly. In the backward pass the kernel
  gradient is then a contraction over every leading axis (batch, queries, ...), and XLA:CPU
  computed it from a transposed copy of the output gradient, fused with that gradient's producer:
  a strided loop that re-evaluates the producer per element. Flattening the leading axes first
  makes forward and backward plain 2-D matmuls. In the full ResNet-50 train step this removed
  most of the transposing copies (benchmarks/RESULTS.md, "Train step").
- With a bfloat16 `dtype` it rounds the bias and the result of every product to bf16 and lets
  XLA:CPU run the dot in float32; `matmul` accumulates in float32 on the CPU's bf16 units.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddetr_jax.models.matmul import matmul


class Dense(nn.Module):
  """x: [..., C_in] -> [..., features] in `dtype` (float32 params; see `matmul` for bf16)."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    out = matmul(x.reshape(-1, x.shape[-1]), kernel, bias, self.dtype)
    return out.reshape(*x.shape[:-1], self.features)
