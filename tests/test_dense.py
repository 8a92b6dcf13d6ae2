"""models/dense.py: `Dense` is a drop-in for flax's nn.Dense (same params, same float32 math) whose
matmul runs on a flattened 2-D view through `models.matmul`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddetr_jax.models.dense import Dense


@pytest.mark.parametrize("shape", [(5, 16), (2, 9, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_is_a_drop_in_for_nn_dense(shape, use_bias):
  x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
  ours = Dense(8, use_bias=use_bias, bias_init=nn.initializers.normal(1.0), name="proj")
  theirs = nn.Dense(8, use_bias=use_bias, bias_init=nn.initializers.normal(1.0), name="proj")
  params = theirs.init(jax.random.PRNGKey(0), x)
  ours_params = ours.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params)
  for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)  # same initialisers, same RNG use
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6, atol=1e-6)
  # Gradients of params and input agree too.
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  for got, want in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                       jax.tree.leaves(jax.grad(loss(theirs), (0, 1))(params, x))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_kernel_gradient_needs_no_transposed_copy_of_the_output_gradient():
  """The first reason for the module: nn.Dense's kernel gradient over [B, S, C] inputs made
  XLA:CPU write a transposed copy of the incoming gradient; the 2-D form needs fewer copies."""
  x = jnp.ones((2, 64, 32))

  def copies(module):
    params = module.init(jax.random.PRNGKey(0), x)
    loss = lambda p, x: jnp.sum(jax.nn.relu(module.apply(p, x)) ** 2)
    text = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    return text.count(" copy(") + text.count(" transpose(")

  assert copies(Dense(48)) < copies(nn.Dense(48))


def test_bfloat16_dense_accumulates_in_float32_and_keeps_float32_kernel_gradients():
  """The second reason: nn.Dense(dtype=bfloat16) rounds the bias and the kernel gradient to bf16."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 50, 64)), jnp.float32)
  module = Dense(32, dtype=jnp.bfloat16, bias_init=nn.initializers.normal(1.0))
  params = module.init(jax.random.PRNGKey(0), x)
  out = module.apply(params, x)
  assert out.dtype == jnp.bfloat16 and out.shape == (3, 50, 32)
  rounded = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  p = params["params"]
  exact = rounded(x) @ rounded(p["kernel"]) + np.asarray(p["bias"], np.float64)
  assert np.max(np.abs(np.asarray(out, np.float64) - exact) / np.abs(exact)) <= 2.0 ** -8
  grads = jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32)))(params)["params"]
  assert grads["kernel"].dtype == jnp.float32
  # d sum / d kernel = sum over rows of the rounded input, exactly representable sums aside.
  np.testing.assert_allclose(grads["kernel"], np.broadcast_to(
      rounded(x).reshape(-1, 64).sum(0)[:, None], (64, 32)), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(grads["bias"], np.full(32, 150.0, np.float32))
