"""models/conv.py: `Conv` (lax convolution or im2col matmul) against torch's conv2d and nn.Conv."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddetr_jax.models import conv as conv_lib
from ddetr_jax.models.conv import Conv

# (input [B, H, W, C], features, kernel, stride, padding, dilation): odd sizes, strides, dilation.
CASES = [((2, 9, 7, 5), 6, 3, 1, 1, 1),
         ((2, 9, 7, 5), 6, 3, 2, 1, 1),
         ((1, 10, 11, 4), 3, 3, 1, 2, 2),
         ((2, 13, 12, 3), 4, 7, 2, 3, 1),
         ((3, 4, 4, 8), 16, 3, 2, 1, 1)]


def _torch_reference(x, kernel, bias, stride, padding, dilation, dy):
  """Output and gradients (x, kernel, bias) of torch conv2d, in NHWC / HWIO, for loss sum(out*dy)."""
  tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
  tw = torch.tensor(np.asarray(kernel).transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
  tb = torch.tensor(np.asarray(bias), dtype=torch.float64, requires_grad=True)
  out = torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=padding, dilation=dilation)
  (out * torch.tensor(np.asarray(dy).transpose(0, 3, 1, 2), dtype=torch.float64)).sum().backward()
  return (out.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1),
          tw.grad.numpy().transpose(2, 3, 1, 0), tb.grad.numpy())


@pytest.mark.parametrize("impl", ["xla", "matmul"])
@pytest.mark.parametrize("case", CASES)
def test_conv_matches_torch_conv2d(impl, case):
  shape, features, k, stride, padding, dilation = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  module = Conv(features, k, stride, padding=padding, dilation=dilation, use_bias=True, impl=impl)
  params = module.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  out = module.apply(params, x)
  dy = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  grads = jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * dy), (0, 1))(params, x)
  want_out, want_dx, want_dw, want_db = _torch_reference(
      x, params["params"]["kernel"], params["params"]["bias"], stride, padding, dilation, dy)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads[1], want_dx, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads[0]["params"]["kernel"], want_dw, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads[0]["params"]["bias"], want_db, rtol=1e-5, atol=1e-4)


def test_conv_is_a_drop_in_for_nn_conv():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 6)), jnp.float32)
  theirs = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv")
  params = theirs.init(jax.random.PRNGKey(0), x)
  for impl in ("xla", "matmul"):
    ours = Conv(5, 3, 2, padding=1, use_bias=True, kernel_init=nn.initializers.lecun_normal(),
                impl=impl, name="conv")
    ours_params = ours.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(ours_params["params"]["kernel"], params["params"]["kernel"])
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)


def _has_convolution(module, x):
  params = module.init(jax.random.PRNGKey(0), x)
  return "conv_general_dilated" in str(jax.make_jaxpr(module.apply)(params, x))


def test_auto_uses_the_matmul_only_when_the_kernel_outweighs_the_patches():
  assert jax.default_backend() == "cpu"
  # ResNet-50 layer4 at 256 px, batch 2: 2*8*8 = 128 output positions <= 512 features.
  assert not _has_convolution(Conv(512, 3, padding=1), jnp.zeros((2, 8, 8, 64)))
  # layer2 at the same size: 2*32*32 = 2048 positions > 128 features.
  assert _has_convolution(Conv(128, 3, padding=1), jnp.zeros((2, 32, 32, 8)))
  # Forced either way.
  assert _has_convolution(Conv(512, 3, padding=1, impl="xla"), jnp.zeros((2, 8, 8, 64)))
  assert not _has_convolution(Conv(128, 3, padding=1, impl="matmul"), jnp.zeros((2, 32, 32, 8)))


def test_bad_impl_is_an_error_naming_it():
  with pytest.raises(ValueError, match="'cudnn'"):
    Conv(4, 3, impl="cudnn").init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))


def test_patches_order_matches_the_hwio_kernel():
  """patch element (i, j, c) sits at (i * k + j) * C + c: the order of kernel.reshape(k*k*C, F)."""
  x = jnp.arange(1 * 3 * 3 * 2, dtype=jnp.float32).reshape(1, 3, 3, 2)
  cols = conv_lib.patches(x, 3, 1, 0, 1)  # one output position, the whole image
  np.testing.assert_array_equal(cols[0, 0, 0], x[0].reshape(-1))
  assert conv_lib.output_size(9, 3, 2, 1, 1) == 5 and conv_lib.output_size(10, 3, 1, 2, 2) == 10


@pytest.mark.parametrize("impl", ["xla", "matmul"])
def test_bfloat16_conv_is_close_to_torch_on_the_rounded_operands(impl):
  """bf16 compute: outputs within bf16 rounding of torch's float64 conv of the bf16-rounded input
  and kernel; the im2col path (`models.matmul`) also keeps a float32-accurate kernel gradient."""
  shape, features, k, stride, padding, dilation = CASES[1]
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32).astype(jnp.bfloat16)
  module = Conv(features, k, stride, padding=padding, dilation=dilation, use_bias=True,
                dtype=jnp.bfloat16, impl=impl)
  params = module.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  out = module.apply(params, x)
  assert out.dtype == jnp.bfloat16
  dy = jnp.asarray(rng.normal(size=out.shape), jnp.float32).astype(jnp.bfloat16)
  grads = jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32) * dy))(params)
  kernel = params["params"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32)
  want_out, _, want_dw, want_db = _torch_reference(
      x.astype(jnp.float32), kernel, params["params"]["bias"], stride, padding, dilation,
      dy.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out, rtol=2.0 ** -7, atol=2e-2)
  dw = grads["params"]["kernel"]
  assert dw.dtype == jnp.float32
  if impl == "matmul":  # never rounded to bf16
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-4)
  else:
    np.testing.assert_allclose(dw, want_dw, rtol=2.0 ** -7, atol=5e-2)
  np.testing.assert_allclose(grads["params"]["bias"], want_db, rtol=1e-5, atol=1e-4)
