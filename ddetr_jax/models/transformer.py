"""Deformable transformer: post-norm encoder, decoder with optional box refinement, two-stage proposals.

Shapes: B batch, S = sum(H_l * W_l) flattened positions over L levels, Q queries, C = d_model.
"""
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddetr_jax import errors
from ddetr_jax.models import initializers
from ddetr_jax.models.dense import Dense
from ddetr_jax.models.deformable_attention import MSDeformAttn
from ddetr_jax.models.dropout import Dropout
from ddetr_jax.models.position_encoding import proposal_sine_embedding

SpatialShapes = tuple[tuple[int, int], ...]
LN_EPS = 1e-5  # PyTorch's LayerNorm default.


def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least eps (official form)."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def encoder_reference_points(spatial_shapes: SpatialShapes, valid_ratios: jax.Array) -> jax.Array:
  """Pixel centres of every level, normalised by each image's valid size, seen from every level.

  Args:
    valid_ratios: [B, L, 2] as (W_valid / W, H_valid / H).
  Returns:
    [B, S, L, 2] normalised (x, y).
  """
  refs = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    ref_y, ref_x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                                jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
    ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # [B, H*W]
    ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)  # [B, H*W]
    refs.append(jnp.stack([ref_x, ref_y], -1))
  reference_points = jnp.concatenate(refs, axis=1)  # [B, S, 2]
  return reference_points[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]


def encoder_proposals(memory: jax.Array, padding_mask: jax.Array,
                      spatial_shapes: SpatialShapes) -> tuple[jax.Array, jax.Array]:
  """Two-stage proposals: one box per encoder position (official `gen_encoder_output_proposals`).

  A box is centred on its pixel, normalised by the valid size, with side 0.05 * 2**level; it is
  kept only if all 4 coordinates lie in (0.01, 0.99) and the position is not padding.

  Args:
    memory: [B, S, C] encoder output.
    padding_mask: [B, S] bool, True = padding.
  Returns:
    memory zeroed at rejected positions [B, S, C], and proposal logits [B, S, 4]
    (inverse sigmoid of (cx, cy, w, h), +inf at rejected positions).
  """
  b = memory.shape[0]
  proposals, start = [], 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    mask_l = padding_mask[:, start:start + h * w].reshape(b, h, w)
    valid_h = jnp.sum(~mask_l[:, :, 0], axis=1).astype(jnp.float32)  # [B]
    valid_w = jnp.sum(~mask_l[:, 0, :], axis=1).astype(jnp.float32)  # [B]
    grid_y, grid_x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                                  indexing="ij")
    grid = jnp.stack([grid_x, grid_y], -1)  # [H, W, 2]
    scale = jnp.stack([valid_w, valid_h], -1).reshape(b, 1, 1, 2)
    grid = (grid[None] + 0.5) / scale  # [B, H, W, 2]
    wh = jnp.full_like(grid, 0.05 * (2.0 ** lvl))
    proposals.append(jnp.concatenate([grid, wh], -1).reshape(b, h * w, 4))
    start += h * w
  proposals = jnp.concatenate(proposals, axis=1)  # [B, S, 4]
  keep = jnp.all((proposals > 0.01) & (proposals < 0.99), axis=-1, keepdims=True)  # [B, S, 1]
  keep = keep & ~padding_mask[..., None]
  proposal_logits = jnp.log(proposals / (1 - proposals))
  proposal_logits = jnp.where(keep, proposal_logits, jnp.inf)
  memory = jnp.where(keep, memory, jnp.zeros((), memory.dtype))
  return memory, proposal_logits


class FeedForward(nn.Module):
  """linear1 -> ReLU -> dropout -> linear2 -> dropout (official FFN of both layer kinds)."""
  d_model: int
  dim_feedforward: int
  dropout: float = 0.1
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C]."""
    xavier = initializers.xavier_uniform()
    h = Dense(self.dim_feedforward, dtype=self.dtype, kernel_init=xavier,
                 bias_init=initializers.torch_bias_default(self.d_model), name="linear1")(x)
    h = Dropout(self.dropout)(nn.relu(h), deterministic=self.deterministic)
    h = Dense(self.d_model, dtype=self.dtype, kernel_init=xavier,
                 bias_init=initializers.torch_bias_default(self.dim_feedforward), name="linear2")(h)
    return Dropout(self.dropout)(h, deterministic=self.deterministic)


class MultiHeadSelfAttention(nn.Module):
  """Standard multi-head attention (as `nn.MultiheadAttention`): separate `q_proj`, `k_proj`,
  `v_proj` (slices of PyTorch's packed in_proj) and `out_proj`; dropout on the attention weights."""
  d_model: int
  n_heads: int
  dropout: float = 0.1
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_key: jax.Array, value: jax.Array) -> jax.Array:
    """query_key: [B, Q, C] (tgt + query_pos), value: [B, Q, C] -> [B, Q, C]."""
    b, q, c = value.shape
    m = self.n_heads
    head_dim = c // m
    in_init = initializers.xavier_uniform(fan_out_mult=3)
    dense = lambda name, init: Dense(c, dtype=self.dtype, kernel_init=init,
                                        bias_init=nn.initializers.zeros, name=name)
    queries = dense("q_proj", in_init)(query_key).reshape(b, q, m, head_dim)
    keys = dense("k_proj", in_init)(query_key).reshape(b, q, m, head_dim)
    values = dense("v_proj", in_init)(value).reshape(b, q, m, head_dim)
    logits = jnp.einsum("bqmd,bkmd->bmqk", queries * (head_dim ** -0.5), keys)  # [B, M, Q, Q]
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights = Dropout(self.dropout)(weights, deterministic=self.deterministic)
    out = jnp.einsum("bmqk,bkmd->bqmd", weights.astype(values.dtype), values).reshape(b, q, c)
    return dense("out_proj", initializers.xavier_uniform())(out)


class EncoderLayer(nn.Module):
  """Post-norm: x = norm1(x + drop(MSDA(x + pos, x))); x = norm2(x + FFN(x))."""
  d_model: int
  n_heads: int
  n_levels: int
  n_points: int
  dim_feedforward: int
  dropout: float
  spatial_shapes: SpatialShapes
  deterministic: bool = True
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array, reference_points: jax.Array,
               padding_mask: jax.Array) -> jax.Array:
    """src, pos: [B, S, C]; reference_points: [B, S, L, 2]; padding_mask: [B, S] -> [B, S, C]."""
    attn = MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points,
                        attention_impl=self.attention_impl, dtype=self.dtype, name="self_attn")(
                            src + pos, reference_points, src, self.spatial_shapes, padding_mask)
    src = src + Dropout(self.dropout)(attn, deterministic=self.deterministic)
    src = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")(src)
    src = src + FeedForward(self.d_model, self.dim_feedforward, self.dropout, self.deterministic,
                            self.dtype, name="ffn")(src)
    return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm2")(src)


class DecoderLayer(nn.Module):
  """Self-attention -> norm2 -> deformable cross-attention -> norm1 -> FFN -> norm3 (official order)."""
  d_model: int
  n_heads: int
  n_levels: int
  n_points: int
  dim_feedforward: int
  dropout: float
  spatial_shapes: SpatialShapes
  deterministic: bool = True
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tgt: jax.Array, query_pos: jax.Array, reference_points: jax.Array,
               memory: jax.Array, memory_padding_mask: jax.Array) -> jax.Array:
    """tgt, query_pos: [B, Q, C]; reference_points: [B, Q, L, 2 or 4]; memory: [B, S, C];
    memory_padding_mask: [B, S] -> [B, Q, C]."""
    drop = lambda x: Dropout(self.dropout)(x, deterministic=self.deterministic)
    attn = MultiHeadSelfAttention(self.d_model, self.n_heads, self.dropout, self.deterministic,
                                  self.dtype, name="self_attn")(tgt + query_pos, tgt)
    tgt = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm2")(tgt + drop(attn))
    attn = MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points,
                        attention_impl=self.attention_impl, dtype=self.dtype, name="cross_attn")(
                            tgt + query_pos, reference_points, memory, self.spatial_shapes,
                            memory_padding_mask)
    tgt = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")(tgt + drop(attn))
    tgt = tgt + FeedForward(self.d_model, self.dim_feedforward, self.dropout, self.deterministic,
                            self.dtype, name="ffn")(tgt)
    return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm3")(tgt)


class DeformableEncoder(nn.Module):
  """`num_layers` encoder layers (`layers_{i}`) on the flattened multi-scale features."""
  num_layers: int
  n_points: int
  layer_kwargs: dict
  remat: bool = False

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array, valid_ratios: jax.Array,
               padding_mask: jax.Array) -> jax.Array:
    """src, pos: [B, S, C]; valid_ratios: [B, L, 2]; padding_mask: [B, S] -> memory [B, S, C]."""
    layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    reference_points = encoder_reference_points(self.layer_kwargs["spatial_shapes"], valid_ratios)
    for i in range(self.num_layers):
      src = layer_cls(n_points=self.n_points, **self.layer_kwargs, name=f"layers_{i}")(
          src, pos, reference_points, padding_mask)
    return src


class DeformableDecoder(nn.Module):
  """`num_layers` decoder layers (`layers_{i}`); with `bbox_heads` the reference of each next layer
  is the previous layer's box prediction (gradient stopped)."""
  num_layers: int
  n_points: int
  layer_kwargs: dict
  remat: bool = False

  @nn.compact
  def __call__(self, tgt: jax.Array, query_pos: jax.Array, reference_points: jax.Array,
               memory: jax.Array, memory_padding_mask: jax.Array, valid_ratios: jax.Array,
               bbox_heads: Optional[Sequence[Callable]] = None) -> tuple[list, list]:
    """tgt, query_pos: [B, Q, C]; reference_points: [B, Q, 2 or 4] in [0, 1]; memory: [B, S, C];
    memory_padding_mask: [B, S]; valid_ratios: [B, L, 2].

    Returns (hidden states, references): lists with one [B, Q, C] / [B, Q, 2 or 4] per layer.
    """
    layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    hidden_states, references = [], []
    out = tgt
    for i in range(self.num_layers):
      if reference_points.shape[-1] == 4:
        ref_input = reference_points[:, :, None] * jnp.concatenate([valid_ratios] * 2, -1)[:, None]
      else:
        ref_input = reference_points[:, :, None] * valid_ratios[:, None]  # [B, Q, L, 2]
      out = layer_cls(n_points=self.n_points, **self.layer_kwargs, name=f"layers_{i}")(
          out, query_pos, ref_input, memory, memory_padding_mask)
      if bbox_heads is not None:
        delta = bbox_heads[i](out).astype(jnp.float32)  # [B, Q, 4]
        if reference_points.shape[-1] == 4:
          new_reference = delta + inverse_sigmoid(reference_points)
        else:
          new_reference = jnp.concatenate(
              [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
        reference_points = jax.lax.stop_gradient(jax.nn.sigmoid(new_reference))
      hidden_states.append(out)
      references.append(reference_points)
    return hidden_states, references


class DeformableTransformer(nn.Module):
  """Encoder + decoder (+ two-stage proposals). The detection heads belong to the caller and are
  passed in: the decoder uses `bbox_heads[l]` to refine references (box refinement) and two-stage
  scores proposals with `class_heads[-1]`/`bbox_heads[-1]`.

  Parameters: `level_embed` [L, C], `encoder/layers_{i}`, `decoder/layers_{i}`, and either
  `reference_points` (Dense C -> 2) or, for two-stage, `enc_output`, `enc_output_norm`,
  `pos_trans`, `pos_trans_norm`.
  """
  d_model: int = 256
  n_heads: int = 8
  enc_layers: int = 6
  dec_layers: int = 6
  dim_feedforward: int = 1024
  dropout: float = 0.1
  n_levels: int = 4
  enc_n_points: int = 4
  dec_n_points: int = 4
  num_queries: int = 300
  two_stage: bool = False
  attention_impl: str = "xla"
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, srcs: Sequence[jax.Array], masks: Sequence[jax.Array], pos_embeds: Sequence[jax.Array],
               valid_ratios: jax.Array, query_embed: Optional[jax.Array],
               class_heads: Sequence[Callable], bbox_heads: Optional[Sequence[Callable]],
               deterministic: bool = True) -> dict:
    """Runs encoder and decoder.

    Args:
      srcs: per level [B, H_l, W_l, C]; masks: per level [B, H_l, W_l] bool (True = padding);
      pos_embeds: per level [B, H_l, W_l, C] float32 sine encodings.
      valid_ratios: [B, L, 2].
      query_embed: [Q, 2C] (query_pos | tgt), or None for two-stage.
      class_heads, bbox_heads: detection heads; bbox_heads is None without box refinement
        (two-stage needs both, with the encoder head last).
    Returns dict with
      `hidden_states` list (one per decoder layer) of [B, Q, C],
      `init_reference` [B, Q, 2 or 4], `references` list of [B, Q, 2 or 4] after each layer,
      and for two-stage `enc_logits` [B, S, K], `enc_box_logits` [B, S, 4].
    """
    c = self.d_model
    b = srcs[0].shape[0]
    spatial_shapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in srcs)
    level_embed = self.param("level_embed", nn.initializers.normal(1.0), (self.n_levels, c), jnp.float32)
    src_flatten = jnp.concatenate([s.reshape(b, -1, c) for s in srcs], axis=1).astype(self.dtype)  # [B, S, C]
    mask_flatten = jnp.concatenate([m.reshape(b, -1) for m in masks], axis=1)  # [B, S]
    pos_flatten = jnp.concatenate(
        [p.reshape(b, -1, c) + level_embed[lvl] for lvl, p in enumerate(pos_embeds)],
        axis=1).astype(self.dtype)  # [B, S, C]

    layer_kwargs = dict(d_model=c, n_heads=self.n_heads, n_levels=self.n_levels,
                        dim_feedforward=self.dim_feedforward, dropout=self.dropout,
                        spatial_shapes=spatial_shapes, deterministic=deterministic,
                        attention_impl=self.attention_impl, dtype=self.dtype)

    # Encoder.
    memory = DeformableEncoder(self.enc_layers, self.enc_n_points, layer_kwargs, self.remat,
                               name="encoder")(src_flatten, pos_flatten, valid_ratios, mask_flatten)

    outputs = {}
    # Queries and initial references.
    if self.two_stage:
      out_memory, proposal_logits = encoder_proposals(memory, mask_flatten, spatial_shapes)
      xavier = initializers.xavier_uniform()
      out_memory = Dense(c, dtype=self.dtype, kernel_init=xavier,
                            bias_init=initializers.torch_bias_default(c), name="enc_output")(out_memory)
      out_memory = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="enc_output_norm")(out_memory)
      enc_logits = class_heads[-1](out_memory).astype(jnp.float32)  # [B, S, K]
      enc_box_logits = bbox_heads[-1](out_memory).astype(jnp.float32) + proposal_logits  # [B, S, 4]
      outputs.update(enc_logits=enc_logits, enc_box_logits=enc_box_logits)
      num_positions = sum(h * w for h, w in spatial_shapes)
      if num_positions < self.num_queries:
        levels = " + ".join(f"{h}x{w}" for h, w in spatial_shapes)
        raise errors.InvalidInputError(
            f"two-stage picks its {self.num_queries} queries among the encoder's positions, but "
            f"these images give only {num_positions} ({levels} over the levels); use larger "
            f"images (the smallest of data.buckets initialises the model) or fewer "
            f"model.num_queries")
      _, topk = jax.lax.top_k(enc_logits[..., 0], self.num_queries)  # [B, Q]
      topk_box_logits = jax.lax.stop_gradient(
          jnp.take_along_axis(enc_box_logits, topk[..., None], axis=1))  # [B, Q, 4]
      reference_points = jax.nn.sigmoid(topk_box_logits)
      pos_trans = Dense(2 * c, dtype=self.dtype, kernel_init=xavier,
                           bias_init=initializers.torch_bias_default(2 * c), name="pos_trans")(
                               proposal_sine_embedding(topk_box_logits, c // 2))
      pos_trans = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="pos_trans_norm")(pos_trans)
      query_pos, tgt = pos_trans[..., :c], pos_trans[..., c:]  # [B, Q, C] each
    else:
      query_pos = jnp.broadcast_to(query_embed[None, :, :c], (b, query_embed.shape[0], c)).astype(self.dtype)
      tgt = jnp.broadcast_to(query_embed[None, :, c:], (b, query_embed.shape[0], c)).astype(self.dtype)
      reference_points = jax.nn.sigmoid(Dense(
          2, dtype=self.dtype, kernel_init=initializers.xavier_uniform(),
          bias_init=nn.initializers.zeros, name="reference_points")(query_pos).astype(jnp.float32))
    outputs["init_reference"] = reference_points

    # Decoder.
    hidden_states, references = DeformableDecoder(
        self.dec_layers, self.dec_n_points, layer_kwargs, self.remat, name="decoder")(
            tgt, query_pos, reference_points, memory, mask_flatten, valid_ratios, bbox_heads)
    outputs.update(hidden_states=hidden_states, references=references)
    return outputs
