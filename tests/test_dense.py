"""models/dense.py: `Dense` is flax's nn.Dense with a flattened 2-D matmul (same math, same params)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddetr_jax.models.dense import Dense, flat_dot_general


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (2, 3, 4, 7)])
def test_flat_dot_general_equals_lax_dot_general(shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  expected = jax.lax.dot_general(x, w, dims)
  np.testing.assert_allclose(flat_dot_general(x, w, dims), expected, rtol=1e-6, atol=1e-6)
  # Gradients of both operands agree too.
  loss = lambda dot: lambda a, b: jnp.sum(jnp.sin(dot(a, b, dims)))
  for got, want in zip(jax.grad(loss(flat_dot_general), (0, 1))(x, w),
                       jax.grad(loss(jax.lax.dot_general), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flat_dot_general_passes_other_contractions_through():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float32)
  dims = (((2,), (1,)), ((0,), (0,)))  # a batched matmul: not the Dense pattern
  np.testing.assert_array_equal(flat_dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))


def test_dense_is_a_drop_in_for_nn_dense():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 16)), jnp.float32)
  ours, theirs = Dense(8, name="proj"), nn.Dense(8, name="proj")
  params = theirs.init(jax.random.PRNGKey(0), x)
  ours_params = ours.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params)
  np.testing.assert_array_equal(ours_params["params"]["kernel"], params["params"]["kernel"])
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6, atol=1e-6)


def test_dense_kernel_gradient_needs_no_transposed_copy_of_the_output_gradient():
  """The reason for the module: nn.Dense's kernel gradient over [B, S, C] inputs made XLA:CPU
  write a transposed copy of the incoming gradient; the 2-D form needs fewer copies."""
  x = jnp.ones((2, 64, 32))

  def copies(module):
    params = module.init(jax.random.PRNGKey(0), x)
    loss = lambda p, x: jnp.sum(jax.nn.relu(module.apply(p, x)) ** 2)
    text = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    return text.count(" copy(") + text.count(" transpose(")

  assert copies(Dense(48)) < copies(nn.Dense(48))
