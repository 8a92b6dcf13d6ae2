"""Parameter initialisers that reproduce the official PyTorch initialisation in distribution.

Flax stores a Dense kernel as (in, out) and a Conv kernel as (kh, kw, in, out); PyTorch stores
(out, in) and (out, in, kh, kw). The fans below follow PyTorch's definitions:
fan_in = in * kh * kw, fan_out = out * kh * kw.
"""
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]


def _fans(shape: Sequence[int]) -> tuple[int, int]:
  """(fan_in, fan_out) of a Flax Dense (in, out) or Conv (kh, kw, in, out) kernel."""
  receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
  return shape[-2] * receptive, shape[-1] * receptive


def torch_linear_default() -> Initializer:
  """`nn.Linear`/`nn.Conv2d` default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(_fans(shape)[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_bias_default(fan_in: int) -> Initializer:
  """`nn.Linear` default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def xavier_uniform(gain: float = 1.0, fan_out_mult: int = 1) -> Initializer:
  """Xavier/Glorot uniform; `fan_out_mult` widens fan_out for a slice of a packed matrix.

  The official decoder self-attention packs q, k, v into one (3 * d, d) `in_proj_weight` that is
  initialised as a whole; its q/k/v slices use fan_out_mult=3.
  """
  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = _fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out * fan_out_mult))
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def kaiming_normal_fan_out() -> Initializer:
  """torchvision ResNet conv init: N(0, 2 / fan_out)."""
  def init(key, shape, dtype=jnp.float32):
    std = math.sqrt(2.0 / _fans(shape)[1])
    return std * jax.random.normal(key, shape, dtype)
  return init


def constant(value) -> Initializer:
  """Every entry equal to `value` (a scalar or an array broadcastable to the shape)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(value, dtype), shape)
  return init


def with_fixed_key(key: jax.Array, initializer: Initializer) -> Initializer:
  """Ignores the scope's key: every head built with the same key gets the same values.

  Used for the box-refinement heads, which the official code deep-copies from one module.
  """
  def init(unused_key, shape, dtype=jnp.float32):
    del unused_key
    return initializer(key, shape, dtype)
  return init
