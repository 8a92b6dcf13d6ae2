"""A k x k convolution that runs as one matmul over image patches when its kernel outweighs them.

A drop-in for `nn.Conv(features, (k, k), strides=(s, s), padding=((p, p), (p, p)),
kernel_dilation=(d, d))` on NHWC inputs, with the same parameters ("kernel" (k, k, C_in,
features), "bias" (features,) when `use_bias`), so checkpoints and the torchvision / official key
mappings are unchanged.

Why: on XLA:CPU the backward pass of a convolution whose kernel is larger than its activations
(ResNet-50's layer4 3x3 convs and the 3x3 stride-2 input projection from C5, at the small images
of a CPU run) is dominated by a transposing copy of the kernel, made for the input gradient
(flipped, input and output channels swapped), and its forward pass runs at a fraction of matmul
speed. As `patches [B*H_out*W_out, k*k*C_in] @ kernel [k*k*C_in, features]` (im2col) the forward
is one matmul, the kernel gradient `patches^T @ dy` another, and the input gradient
`dy @ kernel^T` a third, followed by the adjoint of the patch gather (shifted adds). For
[2, 8, 8, 2048] -> 256 channels, stride 2 (the full config's input_proj_3 at 256 px) forward +
backward took 19.7 ms as a convolution and 4.5 ms as a matmul; ResNet-50 layer4's 3x3 conv at
8 x 8: 13.0 against 6.1 ms. When the patches outweigh the kernel (early stages, large images)
the convolution is faster (layer2 at 32 x 32: 6.8 against 8.1 ms), so "auto" keeps it there.
"auto" also keeps the convolution on GPU and TPU, where none of this was measured.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ddetr_jax import errors
from ddetr_jax.models import initializers
from ddetr_jax.models.matmul import matmul

IMPLS = ("auto", "xla", "matmul")


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
  """Output length of a convolution along one spatial axis."""
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def patches(x: jax.Array, kernel: int, stride: int, padding: int, dilation: int) -> jax.Array:
  """x: [B, H, W, C] -> [B, H_out, W_out, k * k * C], patch element (i, j, c) at (i * k + j) * C + c.

  The flattening order matches an HWIO kernel reshaped to [k * k * C, features].
  """
  b, h, w, c = x.shape
  ho = output_size(h, kernel, stride, padding, dilation)
  wo = output_size(w, kernel, stride, padding, dilation)
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  taps = []
  for i in range(kernel):
    for j in range(kernel):
      start = (0, i * dilation, j * dilation, 0)
      limit = (b, i * dilation + (ho - 1) * stride + 1, j * dilation + (wo - 1) * stride + 1, c)
      taps.append(lax.slice(x, start, limit, (1, stride, stride, 1)))
  return jnp.concatenate(taps, axis=-1)


def use_matmul(impl: str, input_shape: tuple[int, ...], kernel: int, stride: int, padding: int,
               dilation: int, features: int) -> bool:
  """Whether `Conv` computes by im2col + matmul: "matmul", or "auto" on the CPU when the patch
  matrix [B*H_out*W_out, k*k*C_in] is no larger than the kernel [k*k*C_in, features]."""
  if impl not in IMPLS:
    raise errors.InvalidInputError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl == "matmul"
  if jax.default_backend() != "cpu":
    return False
  b, h, w, _ = input_shape
  positions = (b * output_size(h, kernel, stride, padding, dilation)
               * output_size(w, kernel, stride, padding, dilation))
  return positions <= features


class Conv(nn.Module):
  """x: [B, H, W, C_in] -> [B, H_out, W_out, features], H_out = (H + 2p - d(k-1) - 1) // s + 1.

  Square kernel k, stride s, symmetric zero padding p, dilation d. Parameters are float32; the
  operands are rounded to `dtype`, products accumulate in float32 (`preferred_element_type` of
  the convolution, or `models.matmul`), the bias is added in float32 and the result rounded
  once. impl: "auto" (see `use_matmul`), "xla" (lax convolution) or "matmul" (im2col); all
  compute the same convolution up to float rounding.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = initializers.kaiming_normal_fan_out()
  bias_init: Callable = nn.initializers.zeros
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    dtype = jnp.dtype(self.dtype)
    x = x.astype(dtype)
    if use_matmul(self.impl, x.shape, k, self.stride, self.padding, self.dilation, self.features):
      cols = patches(x, k, self.stride, self.padding, self.dilation)
      b, ho, wo, depth = cols.shape
      out = matmul(cols.reshape(b * ho * wo, depth), kernel.reshape(depth, self.features),
                   bias, dtype)
      return out.reshape(b, ho, wo, self.features)
    pad = (self.padding, self.padding)
    out = lax.conv_general_dilated(x, kernel.astype(dtype),
                                   (self.stride, self.stride), (pad, pad),
                                   rhs_dilation=(self.dilation, self.dilation),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   preferred_element_type=jnp.float32)
    return (out if bias is None else out + bias).astype(dtype)
