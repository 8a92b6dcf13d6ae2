"""conv1x1.Conv1x1 (a 1x1 convolution written as a matmul) against torch.nn.functional.conv2d:
outputs, input and kernel gradients, and the parameter layout of nn.Conv."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddetr_jax.models import initializers
from ddetr_jax.models.conv1x1 import Conv1x1


def _torch_conv(x, kernel, bias, stride, cotangent):
  """x: [B, H, W, C] numpy; kernel: [1, 1, C, O]; bias: [O] or None -> (out, dx, dkernel, dbias)
  in JAX layouts (dbias None without a bias)."""
  tx = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
  tk = torch.tensor(kernel.transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
  tb = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
  out = torch.nn.functional.conv2d(tx, tk, tb, stride=stride)
  out.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2), dtype=torch.float64))
  return (out.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1),
          tk.grad.numpy().transpose(2, 3, 1, 0), None if tb is None else tb.grad.numpy())


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("stride,h,w", [(1, 5, 6), (2, 7, 8), (2, 1, 1)])
def test_conv1x1_matches_torch(stride, h, w, use_bias):
  x = np.random.default_rng(3).normal(size=(2, h, w, 6)).astype(np.float32)
  module = Conv1x1(5, stride, use_bias=use_bias, bias_init=nn.initializers.normal(1.0))
  params = module.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
  assert ("bias" in params) == use_bias
  out, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x), params, jnp.asarray(x))
  cotangent = np.random.default_rng(2).normal(size=out.shape)
  bias = np.asarray(params["bias"]) if use_bias else None
  ref_out, ref_dx, ref_dk, ref_db = _torch_conv(x, np.asarray(params["kernel"]), bias, stride,
                                                cotangent)
  assert out.shape == ref_out.shape
  np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-4, atol=1e-4)
  dparams, dx = vjp(jnp.asarray(cotangent, jnp.float32))
  np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dparams["kernel"]), ref_dk, rtol=1e-4, atol=1e-3)
  if use_bias:
    np.testing.assert_allclose(np.asarray(dparams["bias"]), ref_db, rtol=1e-4, atol=1e-4)


def test_same_parameters_and_init_as_nn_conv():
  """Drop-in for a bias-free nn.Conv(1x1): same tree, shapes, initial values and outputs."""
  x = jnp.zeros((1, 9, 9, 4))
  ours = Conv1x1(7).init(jax.random.PRNGKey(5), x)
  conv = nn.Conv(7, (1, 1), use_bias=False, kernel_init=initializers.kaiming_normal_fan_out())
  theirs = conv.init(jax.random.PRNGKey(5), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
  np.testing.assert_array_equal(ours["params"]["kernel"], theirs["params"]["kernel"])
  xs = jax.random.normal(jax.random.PRNGKey(6), (2, 9, 9, 4))
  np.testing.assert_allclose(Conv1x1(7).apply(theirs, xs), conv.apply(theirs, xs),
                             rtol=1e-5, atol=1e-5)


def test_drop_in_for_the_input_projection_conv():
  """With a bias and the input projections' xavier init: same tree, values and outputs as the
  nn.Conv(1x1) it replaces in models.deformable_detr.InputProjection."""
  x = jnp.zeros((1, 4, 5, 64))
  init = initializers.xavier_uniform()
  ours = Conv1x1(32, use_bias=True, kernel_init=init).init(jax.random.PRNGKey(1), x)
  conv = nn.Conv(32, (1, 1), kernel_init=init, bias_init=nn.initializers.zeros)
  theirs = conv.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
  np.testing.assert_array_equal(ours["params"]["kernel"], theirs["params"]["kernel"])
  theirs = jax.tree.map(lambda a: a + 0.5, theirs)   # a non-zero bias
  xs = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 5, 64))
  np.testing.assert_allclose(Conv1x1(32, use_bias=True).apply(theirs, xs), conv.apply(theirs, xs),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute():
  x = jnp.ones((1, 6, 6, 3), jnp.float32)
  module = Conv1x1(4, dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(0), x)
  assert params["params"]["kernel"].dtype == jnp.float32
  assert module.apply(params, x).dtype == jnp.bfloat16
