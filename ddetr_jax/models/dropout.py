"""Dropout whose mask is one fused elementwise pass: Threefry-2x32 keyed per call, counter = index.

`flax.linen.Dropout` draws its mask with `jax.random.bernoulli`. On the CPU, JAX lowers
Threefry with a rolled 5-iteration loop, so every round writes and reads two full uint32 arrays
of the activation's size; in the Deformable DETR train step (ResNet-50, 256 px, on a 2-core
CPU) that made dropout 18% of the summed op time. Here the same hash, Threefry-2x32 with 20
rounds (Salmon et al. 2011, the function `jax.extend.random.threefry_2x32` computes), is
written out round by round on the flat element index, so XLA fuses key schedule, rounds,
threshold and select into a single loop over the activation, on every backend.

Mask rule: element i of an array is kept iff word (i mod 2) of threefry_2x32((k0, k1),
(i div 2, 0)) >= round(rate * 2**32), where (k0, k1) are two uint32 words drawn with
`jax.random.bits` from the module's 'dropout' rng: one hash serves two neighbouring elements,
each reading one of its two output words. The keep probability is 1 - round(rate * 2**32) / 2**32 (exact to
2**-32). The counter is the global flat index, so a batch-sharded array gets the same mask as an
unsharded one. Kept elements are scaled by 1 / (1 - rate), as in `flax.linen.Dropout` and
`torch.nn.Dropout`.

Where the array's size is a multiple of 8, the mask is hashed once and kept packed, 8 elements
a byte (`packed_keep_mask`), and the forward and the backward only unpack its bits (a custom
VJP). With a bool mask XLA fuses the whole hash into each of the mask's consumers, so the train
step hashed most masks two or three times: in the forward select and again in one or two
backward fusions. XLA does not duplicate the packing reduce, so the hash runs once. An FFN block
with two dropouts ([2720, 256] -> 1024 -> 256, forward + backward, 2-core CPU, median of 30):
45.3-49.8 ms with the bool mask, 39.8-45.5 ms packed (three rounds). The mask is the same bit
for bit. Both words of each hash are used (since session 22; before, word 0 of a hash per
element): hashing the packed mask of [2720, 1024] went from 1.95-2.03 ms to 0.74-0.88 ms, and of
[2, 8, 300, 300] (the decoder's attention weights) from 1.17-1.66 ms to 0.51-0.75 ms (2-core
CPU, medians of 30). `Dropout.pack_mask` defaults to packing on the CPU only: on GPU and TPU, recomputing a
hash in a fusion is cheap next to memory traffic, and the trade was not measured there.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ddetr_jax import errors

# Threefry-2x32 rotation constants (two groups of 4 rounds, alternating) and key-schedule parity.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32, 20 rounds, unrolled. k0, k1: uint32 scalars; x0, x1: uint32 [...] counters.

  Returns the two uint32 output words, each shaped like x0.
  """
  ks = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
      x1 = x0 ^ x1
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """bool [shape]: True where an element is kept (probability 1 - rate, see the module doc)."""
  k0, k1, threshold = _hash_key_and_threshold(rng, rate, shape)
  index = lax.iota(jnp.uint32, int(np.prod(shape, dtype=np.int64))).reshape(shape)
  word0, word1 = threefry2x32(k0, k1, index >> np.uint32(1), jnp.zeros_like(index))
  return jnp.where((index & np.uint32(1)) == 0, word0, word1) >= threshold


def _hash_key_and_threshold(rng: jax.Array, rate: float, shape: tuple[int, ...]
                            ) -> tuple[jax.Array, jax.Array, np.uint32]:
  """(k0, k1) uint32 scalars drawn from rng, and the uint32 threshold of the mask rule."""
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2 ** 32:
    raise ValueError(f"dropout on {size} elements (shape {shape}): the uint32 counter covers "
                     f"fewer than 2**32 elements per array")
  words = jax.random.bits(rng, (2,), jnp.uint32)
  return words[0], words[1], np.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """The shape (*lead, n // 8) of `shape`'s mask packed 8 elements to a byte, or None.

  The trailing axes are merged, as few as make a multiple of 8 (n), so the leading (batch) axes
  stay as they are; None when the size is not a multiple of 8.
  """
  for k in range(len(shape) - 1, -1, -1):
    n = int(np.prod(shape[k:], dtype=np.int64))
    if n % 8 == 0:
      return (*shape[:k], n // 8)
  return None


def packed_keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """uint8 [packed_shape(shape)]: `keep_mask(rng, rate, shape)` packed, 8 elements a byte.

  Bit k (value 2**k) of byte j along the last axis is element 8 j + k of the merged trailing
  axes (row-major: the flat order of `shape`).
  """
  pshape = packed_shape(shape)
  if pshape is None:
    raise ValueError(f"dropout mask of shape {shape}: its size is not a multiple of 8")
  k0, k1, threshold = _hash_key_and_threshold(rng, rate, shape)
  # Byte b holds elements 8 b .. 8 b + 7, hashed as counters 4 b .. 4 b + 3: element 8 b + 2 j
  # reads word 0 of counter 4 b + j, element 8 b + 2 j + 1 its word 1.
  counter = lax.iota(jnp.uint32, int(np.prod(shape, dtype=np.int64)) // 2).reshape(*pshape, 4)
  word0, word1 = threefry2x32(k0, k1, counter, jnp.zeros_like(counter))
  even_bit = jnp.arange(4, dtype=jnp.uint8) * jnp.uint8(2)
  bits = (((word0 >= threshold).astype(jnp.uint8) << even_bit)
          | ((word1 >= threshold).astype(jnp.uint8) << (even_bit + jnp.uint8(1))))
  return jnp.sum(bits, axis=-1, dtype=jnp.uint8)


def unpack_keep_mask(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """bool [shape] from `packed_keep_mask`'s uint8 [packed_shape(shape)]."""
  bits = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & jnp.uint8(1)
  return bits.reshape(shape).astype(bool)


def _keep_scaled(keep: jax.Array, x: jax.Array, scale: float) -> jax.Array:
  """x * scale where keep (bool, x's shape), else 0; in x's dtype."""
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _apply_packed(x: jax.Array, packed: jax.Array, scale: float) -> jax.Array:
  """x [...] kept where the packed mask says, times scale; the backward reads the same bytes."""
  return _keep_scaled(unpack_keep_mask(packed, x.shape), x, scale)


def _apply_packed_fwd(x, packed, scale):
  return _apply_packed(x, packed, scale), packed


def _apply_packed_bwd(scale, packed, g):
  # packed is an integer input: its cotangent is None (zero).
  return _apply_packed(g, packed, scale), None


_apply_packed.defvjp(_apply_packed_fwd, _apply_packed_bwd)


class Dropout(nn.Module):
  """Drop-in for `flax.linen.Dropout(rate)(x, deterministic)` with the fused mask above.

  rate: probability of zeroing an element, in [0, 1]. Uses the 'dropout' rng collection.
  pack_mask: hash the mask once and keep it packed (module doc); None: on the CPU only. The
    output and gradients are the same either way.
  """
  rate: float
  rng_collection: str = "dropout"
  pack_mask: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """x: [...] -> [...], same dtype."""
    if not 0.0 <= self.rate <= 1.0:
      raise errors.InvalidInputError(f"dropout rate {self.rate} is outside [0, 1]")
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    rng = self.make_rng(self.rng_collection)
    scale = 1.0 / (1.0 - self.rate)
    pack = jax.default_backend() == "cpu" if self.pack_mask is None else self.pack_mask
    if pack and packed_shape(x.shape) is not None:
      return _apply_packed(x, packed_keep_mask(rng, self.rate, x.shape), scale)
    return _keep_scaled(keep_mask(rng, self.rate, x.shape), x, scale)
