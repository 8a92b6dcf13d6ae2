"""Sine position encodings of Deformable DETR: feature-map positions and two-stage proposals."""
import math

import jax
import jax.numpy as jnp


def _frequencies(num_pos_feats: int, temperature: float) -> jax.Array:
  """dim_t[i] = temperature ** (2 * (i // 2) / num_pos_feats), [num_pos_feats] float32."""
  i = jnp.arange(num_pos_feats, dtype=jnp.float32)
  return temperature ** (2 * jnp.floor(i / 2) / num_pos_feats)


def _interleave_sin_cos(angles: jax.Array) -> jax.Array:
  """[..., F] -> [..., F]: sin of even features and cos of odd ones, interleaved (s0, c1, s2, c3, ...)."""
  stacked = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
  return stacked.reshape(angles.shape)


def sine_position_encoding(padding_mask: jax.Array, num_pos_feats: int = 128,
                           temperature: float = 10000.0, scale: float = 2 * math.pi) -> jax.Array:
  """Normalised sine encoding of pixel positions counted over valid (non-padded) pixels.

  y_embed = cumsum of valid pixels down each column, normalised as
  (y_embed - 0.5) / (y_embed[last row] + 1e-6) * scale (likewise x along rows).

  Args:
    padding_mask: [B, H, W] bool, True = padding.
  Returns:
    [B, H, W, 2 * num_pos_feats] float32: concat(pos_y, pos_x).
  """
  not_mask = (~padding_mask).astype(jnp.float32)
  y_embed = jnp.cumsum(not_mask, axis=1)  # [B, H, W]
  x_embed = jnp.cumsum(not_mask, axis=2)  # [B, H, W]
  eps = 1e-6
  y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
  x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
  dim_t = _frequencies(num_pos_feats, temperature)
  pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)  # [B, H, W, F]
  pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)  # [B, H, W, F]
  return jnp.concatenate([pos_y, pos_x], axis=-1)


def proposal_sine_embedding(proposal_logits: jax.Array, num_pos_feats: int = 128,
                            temperature: float = 10000.0, scale: float = 2 * math.pi) -> jax.Array:
  """Sine embedding of two-stage proposals (official `get_proposal_pos_embed`).

  Args:
    proposal_logits: [B, Q, 4] box logits (cx, cy, w, h before the sigmoid).
  Returns:
    [B, Q, 4 * num_pos_feats] float32, features of each coordinate in turn.
  """
  boxes = jax.nn.sigmoid(proposal_logits.astype(jnp.float32)) * scale  # [B, Q, 4]
  angles = boxes[..., None] / _frequencies(num_pos_feats, temperature)  # [B, Q, 4, F]
  pos = _interleave_sin_cos(angles)
  return pos.reshape(*pos.shape[:-2], 4 * num_pos_feats)
