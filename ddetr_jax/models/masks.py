"""Padding masks per feature level and the valid ratios derived from them.

Convention: True = padding. Masks are resized with PyTorch's legacy `nearest` rule
(`F.interpolate(mask, size)` without align_corners): source index = floor(out_index * (in / out)),
with the scale and product in float32 as PyTorch computes them.
"""
import jax
import jax.numpy as jnp
import numpy as np


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Static source indices of PyTorch's legacy nearest resize, [out_size] int32."""
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
  return np.minimum(idx, in_size - 1)


def resize_padding_mask(padding_mask: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, H, W] bool -> [B, h, w] bool (size = (h, w)), nearest as PyTorch's legacy mode."""
  _, in_h, in_w = padding_mask.shape
  rows = nearest_indices(in_h, size[0])
  cols = nearest_indices(in_w, size[1])
  return padding_mask[:, rows][:, :, cols]


def valid_ratios(padding_mask: jax.Array) -> jax.Array:
  """Fraction of each map that is image: [B, H, W] bool -> [B, 2] float32 as (W_valid / W, H_valid / H).

  As the official code, valid heights are counted in the first column and valid widths in the
  first row (the image sits in the top-left corner).
  """
  _, h, w = padding_mask.shape
  valid_h = jnp.sum(~padding_mask[:, :, 0], axis=1).astype(jnp.float32)  # [B]
  valid_w = jnp.sum(~padding_mask[:, 0, :], axis=1).astype(jnp.float32)  # [B]
  return jnp.stack([valid_w / w, valid_h / h], axis=-1)
