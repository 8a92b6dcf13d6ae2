"""Multi-scale deformable attention module (MSDeformAttn): projections around the sampler op."""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddetr_jax import errors
from ddetr_jax.models import initializers
from ddetr_jax.models.dense import Dense
from ddetr_jax.ops.ms_deform_attn import ms_deform_attn

SpatialShapes = tuple[tuple[int, int], ...]

# Jitted once per static signature: inlined under an outer jit, and reused across layers (instead of
# being dispatched primitive by primitive) when the model runs eagerly, e.g. in tests.
_ms_deform_attn = jax.jit(ms_deform_attn, static_argnames=("spatial_shapes", "impl"))


def sampling_offsets_bias(n_heads: int, n_levels: int, n_points: int) -> np.ndarray:
  """Official offset bias init: head h looks along angle 2*pi*h/n_heads, the direction (cos, sin)
  scaled so its largest coordinate is 1, times (point index + 1).

  Returns [n_heads * n_levels * n_points * 2] float32 in the (head, level, point, xy) order.
  """
  thetas = np.arange(n_heads, dtype=np.float32) * np.float32(2.0 * math.pi / n_heads)
  grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)  # [M, 2]
  grid = grid / np.abs(grid).max(-1, keepdims=True)
  grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))  # [M, L, P, 2]
  grid = grid * np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
  return grid.reshape(-1).astype(np.float32)


class MSDeformAttn(nn.Module):
  """Deformable attention over L feature levels with M heads and P points per head and level.

  Submodules: `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj` (Dense).
  """
  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, reference_points: jax.Array, input_flatten: jax.Array,
               spatial_shapes: SpatialShapes, input_padding_mask: Optional[jax.Array] = None) -> jax.Array:
    """Attends from each query to sampled points of the flattened multi-scale value maps.

    Args:
      query: [B, Q, C] (already including its position embedding).
      reference_points: [B, Q, L, 2] normalised (x, y) in [0, 1] (padding included), or
        [B, Q, L, 4] boxes (cx, cy, w, h): offsets are then relative to half the box size.
      input_flatten: [B, S, C] with S = sum(H_l * W_l) over `spatial_shapes`.
      spatial_shapes: static ((H_0, W_0), ..., (H_{L-1}, W_{L-1})).
      input_padding_mask: [B, S] bool, True = padding (its values are zeroed).
    Returns:
      [B, Q, C].
    """
    if self.d_model % self.n_heads:
      raise errors.InvalidInputError(f"d_model {self.d_model} must be divisible by n_heads "
                                     f"{self.n_heads}")
    b, q, _ = query.shape
    s = input_flatten.shape[1]
    m, l, p = self.n_heads, self.n_levels, self.n_points
    if len(spatial_shapes) != l:
      raise ValueError(f"got {len(spatial_shapes)} spatial shapes {spatial_shapes} for n_levels={l}")
    xavier = initializers.xavier_uniform()
    value = Dense(self.d_model, dtype=self.dtype, kernel_init=xavier,
                     bias_init=nn.initializers.zeros, name="value_proj")(input_flatten)
    if input_padding_mask is not None:
      value = jnp.where(input_padding_mask[..., None], jnp.zeros((), value.dtype), value)
    value = value.reshape(b, s, m, self.d_model // m)  # [B, S, M, D]
    offsets = Dense(m * l * p * 2, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       bias_init=initializers.constant(sampling_offsets_bias(m, l, p)),
                       name="sampling_offsets")(query)
    offsets = offsets.astype(jnp.float32).reshape(b, q, m, l, p, 2)  # [B, Q, M, L, P, 2]
    logits = Dense(m * l * p, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                      bias_init=nn.initializers.zeros, name="attention_weights")(query)
    weights = jax.nn.softmax(logits.astype(jnp.float32).reshape(b, q, m, l * p), axis=-1)
    weights = weights.reshape(b, q, m, l, p)  # [B, Q, M, L, P]
    reference_points = reference_points.astype(jnp.float32)
    if reference_points.shape[-1] == 2:
      normalizer = jnp.array([[w, h] for h, w in spatial_shapes], jnp.float32)  # [L, 2] as (W, H)
      locations = (reference_points[:, :, None, :, None, :]
                   + offsets / normalizer[None, None, None, :, None, :])
    elif reference_points.shape[-1] == 4:
      locations = (reference_points[:, :, None, :, None, :2]
                   + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
    else:
      raise ValueError(f"reference_points must end in 2 or 4 coordinates, got shape {reference_points.shape}")
    # Exposed for visualisation (`mutable=['intermediates']`); a no-op otherwise.
    self.sow("intermediates", "sampling_locations", locations)
    self.sow("intermediates", "sampling_weights", weights)
    # Locations and weights stay float32; the op returns value's (compute) dtype.
    out = _ms_deform_attn(value, spatial_shapes=spatial_shapes, sampling_locations=locations,
                          attention_weights=weights, impl=self.attention_impl)  # [B, Q, M*D]
    return Dense(self.d_model, dtype=self.dtype, kernel_init=xavier,
                    bias_init=nn.initializers.zeros, name="output_proj")(out)
