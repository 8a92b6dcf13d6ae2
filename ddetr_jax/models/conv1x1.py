"""A 1x1 convolution computed as a matmul over channels: a drop-in for `nn.Conv((1, 1))`.

Same parameters as `nn.Conv` ("kernel" (1, 1, C_in, features), "bias" (features,) when
`use_bias`), so checkpoints and the torchvision / official key mappings are unchanged.

Why not `nn.Conv`: XLA:CPU runs a convolution's backward pass much slower than a dot's. The
kernel gradient of a 1x1 conv becomes a conv with batch and feature dimensions swapped, which
needs a transposing copy of the activations (NHWC -> CHWN, slow when fused with the producer);
a dot's gradient is two dots. Writing the ResNet-50 bottleneck's 1x1 convs as matmuls took the
backbone's forward + backward from 0.54-0.61 s to 0.43-0.45 s; the input projections of the
three backbone levels followed (benchmarks/RESULTS.md, "Train step").
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddetr_jax.models import initializers
from ddetr_jax.models.matmul import matmul


class Conv1x1(nn.Module):
  """x: [B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride), features].

  Stride s keeps every s-th row and column from the first, as a 1x1 conv with stride s and no
  padding does. Parameters are float32; the matmul runs in `dtype` (`models.matmul`).
  """
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  use_bias: bool = False
  kernel_init: Callable = initializers.kaiming_normal_fan_out()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    if self.stride > 1:
      x = x[:, ::self.stride, ::self.stride]
    # A 2-D matmul: with the 4-D einsum, XLA:CPU computed the kernel gradient (a contraction over
    # b, h, w) from a transposed copy of the output gradient, fused with its producer (slow).
    b, h, w, c = x.shape
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    out = matmul(x.reshape(b * h * w, c), kernel[0, 0], bias, self.dtype)
    return out.reshape(b, h, w, self.features)
