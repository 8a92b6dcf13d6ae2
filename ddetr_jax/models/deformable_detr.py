"""Deformable DETR detector: backbone, input projections, deformable transformer, detection heads.

Parameter tree (Flax names; see ddetr_jax/convert.py for the PyTorch names):
  backbone/{conv1, bn1, layer{N}_{i}/{conv1..3, bn1..3, downsample_conv, downsample_bn}}
  input_proj_{l}/{conv, group_norm}
  transformer/level_embed, transformer/encoder/layers_{i}, transformer/decoder/layers_{i}
  transformer/reference_points | transformer/{enc_output, enc_output_norm, pos_trans, pos_trans_norm}
  query_embed [Q, 2C] (query_pos | tgt)          (not two-stage)
  class_embed, bbox_embed/layers_{0,1,2}        (shared heads, without box refinement)
  class_embed_{k}, bbox_embed_{k}/layers_{0,1,2} (box refinement: one per decoder layer, plus the
                                                 encoder head k = dec_layers for two-stage)
"""
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddetr_jax import errors
from ddetr_jax.models import initializers
from ddetr_jax.models.dense import Dense
from ddetr_jax.models.backbone import ResNet
from ddetr_jax.models.conv import IMPLS as CONV_IMPLS, Conv
from ddetr_jax.models.conv1x1 import Conv1x1
from ddetr_jax.models.masks import resize_padding_mask, valid_ratios
from ddetr_jax.models.position_encoding import sine_position_encoding
from ddetr_jax.models.transformer import DeformableTransformer, inverse_sigmoid

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class InputProjection(nn.Module):
  """Conv (1x1 as a `Conv1x1` matmul, or a 3x3 stride 2 `Conv` for extra levels) + GroupNorm(32) to
  d_model channels."""
  features: int
  kernel: int = 1
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride), features]."""
    if self.kernel == 1 and self.stride == 1:
      x = Conv1x1(self.features, dtype=self.dtype, use_bias=True,
                  kernel_init=initializers.xavier_uniform(), name="conv")(x)
    else:
      x = Conv(self.features, self.kernel, self.stride, padding=self.kernel // 2, use_bias=True,
               dtype=self.dtype, kernel_init=initializers.xavier_uniform(), name="conv")(x)
    return nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=self.dtype, name="group_norm")(x)


class MLP(nn.Module):
  """Box head: Dense layers `layers_{i}` with ReLU between them (official 256-256-256-4)."""
  hidden_dim: int
  output_dim: int
  num_layers: int = 3
  kernel_inits: Optional[Sequence[Callable]] = None
  bias_inits: Optional[Sequence[Callable]] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., output_dim]."""
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype,
                   kernel_init=self.kernel_inits[i], bias_init=self.bias_inits[i], name=f"layers_{i}")(x)
      if not last:
        x = nn.relu(x)
    return x


class DeformableDETR(nn.Module):
  """Deformable DETR (Zhu et al., ICLR 2021) in its five official variants.

  Built as `DeformableDETR(**config.model)`; field names follow the official arguments.
  `num_feature_levels` 1 uses layer4 only (`dilation` True: DC5); 4 uses layer2-4 plus one extra
  stride-2 level. `with_box_refine` makes per-layer heads that refine the references;
  `two_stage` (requires with_box_refine) takes queries from encoder proposals.
  `dtype` is the compute dtype ("float32" or "bfloat16"; "float16" is accepted but untested and
  has no loss scaling); parameters stay float32 and softmax, normalisation statistics, sampling
  locations and box sigmoids run in float32.
  """
  backbone_depth: int = 50
  backbone_norm: str = "frozen_bn"
  backbone_width: int = 64
  backbone_stem_impl: str = "auto"
  dilation: bool = False
  num_feature_levels: int = 4
  hidden_dim: int = 256
  nheads: int = 8
  enc_layers: int = 6
  dec_layers: int = 6
  dim_feedforward: int = 1024
  dropout: float = 0.1
  enc_n_points: int = 4
  dec_n_points: int = 4
  num_queries: int = 300
  num_classes: int = 91
  with_box_refine: bool = False
  two_stage: bool = False
  aux_loss: bool = True
  dtype: str = "float32"
  attention_impl: str = "xla"
  remat: bool = False

  def _check(self):
    if self.two_stage and not self.with_box_refine:
      raise errors.InvalidInputError("two_stage=True requires with_box_refine=True (as the official code)")
    if self.dtype not in DTYPES:
      raise errors.InvalidInputError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.hidden_dim % 32:
      raise errors.InvalidInputError(f"hidden_dim must be a multiple of 32 (GroupNorm(32)), got {self.hidden_dim}")
    if self.num_feature_levels < 1:
      raise errors.InvalidInputError(f"num_feature_levels must be >= 1, got {self.num_feature_levels}")
    if self.backbone_stem_impl not in CONV_IMPLS:
      raise errors.InvalidInputError(f"model.backbone_stem_impl must be one of {CONV_IMPLS}, "
                                     f"got {self.backbone_stem_impl!r}")

  def _heads(self, init_key: jax.Array, num_pred: int):
    """Class and box heads: one shared pair, or `num_pred` pairs cloned from one initialisation."""
    c, dtype = self.hidden_dim, DTYPES[self.dtype]
    prior_bias = -math.log((1 - 0.01) / 0.01)
    linear_default = initializers.torch_linear_default()

    def head_pair(name_suffix: str, box_bias: tuple[float, ...], key: Optional[jax.Array]):
      fixed = (lambda i, init: initializers.with_fixed_key(jax.random.fold_in(key, i), init)
               if key is not None else init)
      class_head = Dense(self.num_classes, dtype=dtype, kernel_init=fixed(0, linear_default),
                            bias_init=initializers.constant(prior_bias), name=f"class_embed{name_suffix}")
      box_head = MLP(c, 4, 3, dtype=dtype,
                     kernel_inits=(fixed(1, linear_default), fixed(2, linear_default),
                                   nn.initializers.zeros),
                     bias_inits=(fixed(3, initializers.torch_bias_default(c)),
                                 fixed(4, initializers.torch_bias_default(c)),
                                 initializers.constant(box_bias)),
                     name=f"bbox_embed{name_suffix}")
      return class_head, box_head

    if not self.with_box_refine:
      class_head, box_head = head_pair("", (0.0, 0.0, -2.0, -2.0), None)
      return [class_head] * num_pred, [box_head] * num_pred
    class_heads, box_heads = [], []
    for k in range(num_pred):
      # Official: the heads are deep copies of one module; only head 0 gets bias[2:] = -2, and
      # two-stage then resets bias[2:] = 0 on every head.
      bias = (0.0, 0.0, -2.0, -2.0) if k == 0 and not self.two_stage else (0.0,) * 4
      class_head, box_head = head_pair(f"_{k}", bias, init_key)
      class_heads.append(class_head)
      box_heads.append(box_head)
    return class_heads, box_heads

  @nn.compact
  def __call__(self, images: jax.Array, padding_mask: jax.Array, train: bool = False) -> dict:
    """Detects objects.

    Args:
      images: [B, H, W, 3] ImageNet-normalised float32.
      padding_mask: [B, H, W] bool, True = padding.
      train: enables dropout (rng collection 'dropout').
    Returns dict:
      `pred_logits` [B, Q, num_classes] float32 (sigmoid classification logits),
      `pred_boxes` [B, Q, 4] float32 normalised (cx, cy, w, h),
      `aux_outputs` list (dec_layers - 1 entries if aux_loss else empty) of dicts with the same keys
        for the earlier decoder layers,
      `enc_outputs` (two-stage only) dict `pred_logits` [B, S, num_classes], `pred_boxes` [B, S, 4]
        for every encoder position (boxes of rejected positions are 1.0).
    """
    self._check()
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    if padding_mask.shape != images.shape[:3]:
      raise ValueError(f"padding_mask shape {padding_mask.shape} must be images' [B, H, W] {images.shape[:3]}")
    dtype = DTYPES[self.dtype]
    c = self.hidden_dim
    multi_scale = self.num_feature_levels > 1
    features = ResNet(self.backbone_depth, self.dilation, (2, 3, 4) if multi_scale else (4,),
                      dtype=dtype, norm=self.backbone_norm, width=self.backbone_width,
                      stem_impl=self.backbone_stem_impl, name="backbone")(images)

    srcs, masks = [], []
    for lvl, feature in enumerate(features[:self.num_feature_levels]):
      srcs.append(InputProjection(c, dtype=dtype, name=f"input_proj_{lvl}")(feature))
      masks.append(resize_padding_mask(padding_mask, feature.shape[1:3]))
    for lvl in range(len(srcs), self.num_feature_levels):
      source = features[-1] if lvl == len(features) else srcs[-1]
      srcs.append(InputProjection(c, kernel=3, stride=2, dtype=dtype, name=f"input_proj_{lvl}")(source))
      masks.append(resize_padding_mask(padding_mask, srcs[-1].shape[1:3]))
    pos_embeds = [sine_position_encoding(m, c // 2) for m in masks]  # [B, H_l, W_l, C] float32
    ratios = jnp.stack([valid_ratios(m) for m in masks], axis=1)  # [B, L, 2]

    num_pred = self.dec_layers + 1 if self.two_stage else self.dec_layers
    init_key = self.make_rng("params") if self.is_initializing() else None
    class_heads, box_heads = self._heads(init_key, num_pred)
    query_embed = None
    if not self.two_stage:
      query_embed = self.param("query_embed", nn.initializers.normal(1.0), (self.num_queries, 2 * c),
                               jnp.float32)
    out = DeformableTransformer(
        d_model=c, n_heads=self.nheads, enc_layers=self.enc_layers, dec_layers=self.dec_layers,
        dim_feedforward=self.dim_feedforward, dropout=self.dropout, n_levels=self.num_feature_levels,
        enc_n_points=self.enc_n_points, dec_n_points=self.dec_n_points, num_queries=self.num_queries,
        two_stage=self.two_stage, attention_impl=self.attention_impl, remat=self.remat, dtype=dtype,
        name="transformer")(srcs, masks, pos_embeds, ratios, query_embed, class_heads,
                            box_heads if self.with_box_refine else None, deterministic=not train)

    predictions = []
    for lvl, hidden in enumerate(out["hidden_states"]):
      reference = inverse_sigmoid(out["init_reference"] if lvl == 0 else out["references"][lvl - 1])
      logits = class_heads[lvl](hidden).astype(jnp.float32)  # [B, Q, K]
      delta = box_heads[lvl](hidden).astype(jnp.float32)  # [B, Q, 4]
      if reference.shape[-1] == 4:
        box_logits = delta + reference
      else:
        box_logits = jnp.concatenate([delta[..., :2] + reference, delta[..., 2:]], -1)
      predictions.append({"pred_logits": logits, "pred_boxes": jax.nn.sigmoid(box_logits)})
    outputs = dict(predictions[-1])
    outputs["aux_outputs"] = predictions[:-1] if self.aux_loss else []
    if self.two_stage:
      outputs["enc_outputs"] = {"pred_logits": out["enc_logits"],
                                "pred_boxes": jax.nn.sigmoid(out["enc_box_logits"])}
    return outputs
