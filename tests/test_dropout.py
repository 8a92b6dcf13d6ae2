"""models/dropout.py: the fused Threefry dropout mask."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddetr_jax.models.dropout import (Dropout, keep_mask, packed_keep_mask, packed_shape,
                                      threefry2x32, unpack_keep_mask)


def test_threefry_matches_jax_reference():
  """The unrolled hash equals JAX's own Threefry-2x32 on random keys and counters."""
  rng = np.random.default_rng(0)
  for _ in range(5):
    key = rng.integers(0, 2 ** 32, size=2, dtype=np.uint32)
    counters = rng.integers(0, 2 ** 32, size=(2, 1000), dtype=np.uint32)
    ours = jax.jit(threefry2x32)(key[0], key[1], counters[0], counters[1])
    # JAX's threefry_2x32 hashes a flat count array as its two halves (x0, x1).
    ref = np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(counters.reshape(-1))))
    np.testing.assert_array_equal(np.asarray(ours[0]), ref[:1000])
    np.testing.assert_array_equal(np.asarray(ours[1]), ref[1000:])


@pytest.mark.parametrize("shape", [(5, 24), (3, 7), (2, 8, 3, 5)])
def test_mask_follows_the_rule_with_jax_threefry(shape):
  """Element i is kept iff word (i mod 2) of Threefry-2x32(key words, (i div 2, 0)) clears
  round(rate * 2**32): checked with JAX's own threefry_2x32, packed and unpacked."""
  key, rate = jax.random.PRNGKey(3), 0.3
  words = jnp.asarray(jax.random.bits(key, (2,), jnp.uint32))
  n = int(np.prod(shape))
  counters = (np.arange(n) // 2).astype(np.uint32)
  hashed = np.asarray(threefry_2x32(words, jnp.asarray(
      np.concatenate([counters, np.zeros(n, np.uint32)]))))
  word = np.where(np.arange(n) % 2 == 0, hashed[:n], hashed[n:])
  expected = (word >= np.uint32(round(rate * 2 ** 32))).reshape(shape)
  np.testing.assert_array_equal(np.asarray(keep_mask(key, rate, shape)), expected)
  if packed_shape(shape) is not None:
    packed = packed_keep_mask(key, rate, shape)
    np.testing.assert_array_equal(np.asarray(unpack_keep_mask(packed, shape)), expected)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_and_scale(rate):
  x = jnp.asarray(np.random.default_rng(1).uniform(1.0, 2.0, size=(4, 500, 512)), jnp.float32)
  y = np.asarray(Dropout(rate).apply({}, x, deterministic=False,
                                     rngs={"dropout": jax.random.PRNGKey(3)}))
  kept = y != 0
  n = kept.size
  # Binomial(n, 1 - rate): 6 standard deviations.
  assert abs(kept.sum() - n * (1 - rate)) < 6 * np.sqrt(n * rate * (1 - rate))
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
  # No structure along any axis: every row and column keeps about the same fraction.
  per_col = kept.reshape(-1, 512).mean(0)
  per_row = kept.reshape(-1, 512).mean(1)
  assert abs(per_col - (1 - rate)).max() < 6 * np.sqrt(rate * (1 - rate) / 2000)
  assert abs(per_row - (1 - rate)).max() < 6 * np.sqrt(rate * (1 - rate) / 512)


def test_neighbouring_elements_are_independent():
  """Pairs of adjacent elements (along the last axis and across rows) are kept independently."""
  keep = np.asarray(keep_mask(jax.random.PRNGKey(7), 0.5, (1000, 1000)))
  for a, b in ((keep[:, :-1], keep[:, 1:]), (keep[:-1], keep[1:])):
    both = (a & b).mean()
    assert abs(both - 0.25) < 6 * np.sqrt(0.25 * 0.75 / a.size)


def test_keys_and_modules_give_different_masks():
  shape = (64, 64)
  m0 = np.asarray(keep_mask(jax.random.PRNGKey(0), 0.5, shape))
  np.testing.assert_array_equal(m0, np.asarray(keep_mask(jax.random.PRNGKey(0), 0.5, shape)))
  m1 = np.asarray(keep_mask(jax.random.PRNGKey(1), 0.5, shape))
  assert 0.4 < (m0 != m1).mean() < 0.6

  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Dropout(0.5)(x, deterministic=False), Dropout(0.5)(x, deterministic=False)

  a, b = Two().apply({}, jnp.ones(shape), rngs={"dropout": jax.random.PRNGKey(0)})
  assert 0.4 < (np.asarray(a != 0) != np.asarray(b != 0)).mean() < 0.6


def test_deterministic_and_edge_rates():
  x = jnp.arange(12.0).reshape(3, 4) + 1
  key = {"dropout": jax.random.PRNGKey(0)}
  np.testing.assert_array_equal(Dropout(0.3).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False, rngs=key), x)
  np.testing.assert_array_equal(Dropout(1.0).apply({}, x, deterministic=False, rngs=key), 0 * x)
  with pytest.raises(ValueError, match="rate 1.5"):
    Dropout(1.5).apply({}, x, deterministic=False, rngs=key)
  y = Dropout(0.5).apply({}, x.astype(jnp.bfloat16), deterministic=False, rngs=key)
  assert y.dtype == jnp.bfloat16


def test_gradient_is_the_scaled_mask():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 33)), jnp.float32)
  key = {"dropout": jax.random.PRNGKey(4)}
  f = lambda x: jnp.sum(Dropout(0.25).apply({}, x, deterministic=False, rngs=key) * 3.0)
  grad = np.asarray(jax.grad(f)(x))
  kept = np.asarray(Dropout(0.25).apply({}, x, deterministic=False, rngs=key)) != 0
  np.testing.assert_allclose(grad, np.where(kept, 3.0 / 0.75, 0.0), rtol=1e-6)


def test_batch_sharded_mask_equals_unsharded():
  """The counter is the global index: 8-way batch sharding draws the same mask."""
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 40, 24)), jnp.float32)
  f = jax.jit(lambda x, k: Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": k}))
  key = jax.random.PRNGKey(11)
  single = np.asarray(f(x, key))
  shard = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  sharded = f(jax.device_put(x, shard), key)
  assert sharded.sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(sharded), single)


@pytest.mark.parametrize("shape, expected", [
    ((2, 1360, 256), (2, 1360, 32)),    # encoder activations: the last axis alone
    ((2, 8, 300, 300), (2, 8, 11250)),  # attention weights: 300 is not a multiple of 8
    ((8, 33), (33,)),
    ((5, 3, 8), (5, 3, 1)),
    ((3, 5), None),
    ((7,), None),
])
def test_packed_shape(shape, expected):
  assert packed_shape(shape) == expected


@pytest.mark.parametrize("shape", [(2, 16, 24), (2, 8, 30, 30), (8, 33), (5, 3, 8)])
def test_packed_mask_is_the_mask_bit_for_bit(shape):
  key = jax.random.PRNGKey(21)
  keep = np.asarray(keep_mask(key, 0.3, shape))
  packed = np.asarray(packed_keep_mask(key, 0.3, shape))
  assert packed.dtype == np.uint8 and packed.shape == packed_shape(shape)
  # Independent unpacking: numpy's little-endian bit order is bit k = element 8 j + k.
  bits = np.unpackbits(packed[..., None], axis=-1, bitorder="little")
  np.testing.assert_array_equal(bits.reshape(shape).astype(bool), keep)
  np.testing.assert_array_equal(np.asarray(unpack_keep_mask(jnp.asarray(packed), shape)), keep)
  with pytest.raises(ValueError, match=r"\(3, 5\).*multiple of 8"):
    packed_keep_mask(key, 0.3, (3, 5))


@pytest.mark.parametrize("shape, pack_mask", [
    ((4, 6, 16), None),   # packed (the CPU default)
    ((4, 6, 16), False),  # the bool mask, as on GPU and TPU
    ((3, 5, 7), None),    # size not a multiple of 8: the bool mask
])
def test_output_and_gradient_follow_the_mask(shape, pack_mask):
  """Every path: y = x / (1 - rate) where kept, else 0; dL/dx = that mask times dL/dy."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=shape), jnp.float32)
  key = jax.random.PRNGKey(9)
  rate = 0.4


  class Rng(nn.Module):  # the key a root module's first make_rng('dropout') draws
    def __call__(self):
      return self.make_rng("dropout")

  keep = np.asarray(keep_mask(Rng().apply({}, rngs={"dropout": key}), rate, shape))
  assert 0.4 < keep.mean() < 0.8

  def loss(x):
    y = Dropout(rate, pack_mask=pack_mask).apply({}, x, deterministic=False,
                                                 rngs={"dropout": key})
    return jnp.sum(jnp.sin(y) * w), y

  (_, y), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
  scale = np.float32(1.0 / (1.0 - rate))
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  np.testing.assert_array_equal(np.asarray(y), np.where(keep, np.asarray(x) * scale, 0.0))
  expected = np.where(keep, np.cos(x64 * scale) * w64 * scale, 0.0)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-6)


def _hashing_computations(hlo_text: str) -> list[str]:
  """Names of the computations in compiled HLO text that run Threefry over a whole array.

  The unrolled hash has 19 live xor's over the counters; the key derivation's hash works on
  1-2 words in rolled loops (fewer than 10 xor's per computation).
  """
  found, name, xors = [], None, 0
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name, xors = header.group(1), 0
    elif line.startswith("}") and name:
      if xors >= 10:
        found.append(name)
      name = None
    elif name and " xor(" in line:
      xors += 1
  return found


def test_train_step_hashes_each_mask_once():
  """Forward and backward of a dropout read one hashed mask: XLA does not re-hash it."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)

  def loss(x, w, key):
    h = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": key})
    return jnp.sum(jnp.tanh(h @ w) * h)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  hlo = step.lower(x, w, jax.random.PRNGKey(0)).compile().as_text()
  assert len(_hashing_computations(hlo)) == 1, _hashing_computations(hlo)

  # What packing avoids: with the bool mask XLA hashes it in the forward and again backward.
  def unpacked(x, w, key):
    h = Dropout(0.1, pack_mask=False).apply({}, x, deterministic=False, rngs={"dropout": key})
    return jnp.sum(jnp.tanh(h @ w) * h)

  hlo = jax.jit(jax.value_and_grad(unpacked, argnums=(0, 1))).lower(
      x, w, jax.random.PRNGKey(0)).compile().as_text()
  assert len(_hashing_computations(hlo)) >= 2
