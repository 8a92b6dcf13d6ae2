"""models/dropout.py: the fused Threefry dropout mask."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddetr_jax.models.dropout import Dropout, keep_mask, threefry2x32


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
