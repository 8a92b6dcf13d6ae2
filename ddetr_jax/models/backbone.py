"""ResNet backbone in the torchvision layout with frozen BatchNorm and optional dilation (DC5).

Parameter names mirror torchvision so that checkpoints map one to one: `conv1`, `bn1`,
`layer{N}_{i}` (block i of layerN) holding `conv1..3`, `bn1..3`, `downsample_conv`,
`downsample_bn`. Every BatchNorm is frozen: its four arrays (`scale`, `bias`, `mean`, `var`)
live in the 'params' collection under a module whose name contains `bn` (the optimizer never
updates them) and the forward pass uses them as constants with eps 1e-5.

`norm="group"` replaces every BatchNorm by a trainable GroupNorm (32 groups, eps 1e-5) named
`gn*` instead of `bn*`, with the last norm of each residual branch initialised to zero scale (the
block starts as the identity). This is for training a backbone from scratch, where frozen
BatchNorm with no pretrained statistics normalises nothing (He et al., "Rethinking ImageNet
Pre-training", 2019, train detectors from scratch with GroupNorm); torchvision checkpoints
only load into the default `norm="frozen_bn"`.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddetr_jax import errors
from ddetr_jax.models import initializers
from ddetr_jax.models.conv import Conv
from ddetr_jax.models.conv1x1 import Conv1x1

# depth -> (block type, blocks per stage)
RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
NORMS = ("frozen_bn", "group")
TORCHVISION_WIDTH = 64   # channels of the stem and layer1 in every torchvision ResNet.


def _check_width(width: int):
  if not isinstance(width, int) or width < 8 or width % 8:
    raise errors.InvalidInputError(f"backbone_width must be a positive multiple of 8, got {width!r}")


def stage_channels(depth: int, width: int = TORCHVISION_WIDTH) -> tuple[int, int, int, int]:
  """Output channels of layer1..layer4 for a ResNet depth and stem width (64 = torchvision)."""
  if depth not in RESNET_LAYOUTS:
    raise errors.InvalidInputError(f"backbone_depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
  _check_width(width)
  expansion = 4 if RESNET_LAYOUTS[depth][0] == "bottleneck" else 1
  return tuple(width * 2 ** stage * expansion for stage in range(4))


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed affine parameters and statistics: y = (x - mean) / sqrt(var + eps) * scale + bias."""
  features: int
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C] in x's dtype (the folded scale/shift are computed in float32)."""
    scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (self.features,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (self.features,), jnp.float32)
    scale, bias, mean, var = (jax.lax.stop_gradient(a) for a in (scale, bias, mean, var))
    folded_scale = scale * jax.lax.rsqrt(var + self.eps)
    folded_bias = bias - mean * folded_scale
    return x * folded_scale.astype(x.dtype) + folded_bias.astype(x.dtype)


def _norm(kind: str, features: int, name: str, dtype: Any, zero_init: bool = False) -> nn.Module:
  """The norm layer `name` (a torchvision `bn*` name): FrozenBatchNorm, or GroupNorm as `gn*`."""
  if kind == "frozen_bn":
    return FrozenBatchNorm(features, name=name)
  if kind == "group":
    return nn.GroupNorm(num_groups=min(32, features), epsilon=1e-5, dtype=dtype,
                        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
                        name=name.replace("bn", "gn"))
  raise errors.InvalidInputError(f"backbone_norm must be one of {NORMS}, got {kind!r}")


def _conv(features: int, kernel: int, stride: int, dilation: int, dtype: Any, name: str,
          impl: str = "auto") -> Conv:
  """Bias-free conv with PyTorch's symmetric padding dilation * (kernel // 2)."""
  return Conv(features, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation,
              dtype=dtype, kernel_init=initializers.kaiming_normal_fan_out(), name=name, impl=impl)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). Dilation applies to both convs (torchvision refuses dilation
  in basic blocks; this extension lets small backbones run the DC5 variant)."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  norm: str = "frozen_bn"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H / stride, W / stride, planes]."""
    out = _conv(self.planes, 3, self.stride, self.dilation, self.dtype, "conv1")(x)
    out = nn.relu(_norm(self.norm, self.planes, "bn1", self.dtype)(out))
    out = _conv(self.planes, 3, 1, self.dilation, self.dtype, "conv2")(out)
    out = _norm(self.norm, self.planes, "bn2", self.dtype, zero_init=True)(out)
    if self.downsample:
      x = Conv1x1(self.planes, self.stride, self.dtype, name="downsample_conv")(x)
      x = _norm(self.norm, self.planes, "downsample_bn", self.dtype)(x)
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 with expansion 4 (torchvision v1.5: stride in the 3x3).
  The 1x1 convs are `Conv1x1` (matmuls)."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  norm: str = "frozen_bn"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H / stride, W / stride, 4 * planes]."""
    out = Conv1x1(self.planes, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(_norm(self.norm, self.planes, "bn1", self.dtype)(out))
    out = _conv(self.planes, 3, self.stride, self.dilation, self.dtype, "conv2")(out)
    out = nn.relu(_norm(self.norm, self.planes, "bn2", self.dtype)(out))
    out = Conv1x1(self.planes * 4, dtype=self.dtype, name="conv3")(out)
    out = _norm(self.norm, self.planes * 4, "bn3", self.dtype, zero_init=True)(out)
    if self.downsample:
      x = Conv1x1(self.planes * 4, self.stride, self.dtype, name="downsample_conv")(x)
      x = _norm(self.norm, self.planes * 4, "downsample_bn", self.dtype)(x)
    return nn.relu(out + x)


class ResNet(nn.Module):
  """torchvision ResNet trunk (no pooling head) returning the requested stage outputs.

  Attributes:
    depth: 18, 34, 50 or 101.
    dilation: replace layer4's stride 2 by dilation 2 (DC5): as torchvision's
      `replace_stride_with_dilation=[False, False, True]`, the first block of layer4 keeps
      dilation 1 with stride 1 and the following blocks use dilation 2.
    return_layers: which of layer1..4 to return (1-based), e.g. (2, 3, 4) or (4,).
    norm: "frozen_bn" (official, loads torchvision weights) or "group" (trainable GroupNorm,
      for training from scratch; see the module docstring).
    width: channels of the stem and layer1; stage s (0-based) has width * 2**s planes. 64 is
      torchvision's (the only width its checkpoints fit); smaller widths give a cheaper
      backbone for training from scratch on small images (the CPU shapes demo uses 32).
    stem_impl: `models.conv.Conv`'s impl for the 7x7 stem conv ("auto", "xla" or "matmul"):
      the same convolution, computed as a lax convolution or as one matmul over image patches.
  """
  depth: int = 50
  dilation: bool = False
  return_layers: Sequence[int] = (2, 3, 4)
  dtype: Any = jnp.float32
  norm: str = "frozen_bn"
  width: int = TORCHVISION_WIDTH
  stem_impl: str = "auto"

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    """images: [B, H, W, 3] -> list of [B, H_l, W_l, C_l] for each layer in `return_layers`."""
    if self.depth not in RESNET_LAYOUTS:
      raise errors.InvalidInputError(f"backbone_depth must be one of {sorted(RESNET_LAYOUTS)}, got {self.depth}")
    kind, blocks = RESNET_LAYOUTS[self.depth]
    _check_width(self.width)
    stem = self.width
    block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
    expansion = 4 if kind == "bottleneck" else 1
    x = images.astype(self.dtype)
    x = _conv(stem, 7, 2, 1, self.dtype, "conv1", impl=self.stem_impl)(x)
    x = nn.relu(_norm(self.norm, stem, "bn1", self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # [B, H/4, W/4, stem]
    in_channels, current_dilation, outputs = stem, 1, []
    for stage, num_blocks in enumerate(blocks):
      planes = stem * 2 ** stage
      stride = 1 if stage == 0 else 2
      previous_dilation = current_dilation
      if stage == 3 and self.dilation:
        current_dilation *= stride
        stride = 1
      for i in range(num_blocks):
        x = block_cls(
            planes,
            stride=stride if i == 0 else 1,
            dilation=previous_dilation if i == 0 else current_dilation,
            downsample=i == 0 and (stride != 1 or in_channels != planes * expansion),
            dtype=self.dtype,
            norm=self.norm,
            name=f"layer{stage + 1}_{i}")(x)
        in_channels = planes * expansion
      if stage + 1 in self.return_layers:
        outputs.append(x)
    return outputs
