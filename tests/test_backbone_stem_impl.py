"""`model.backbone_stem_impl`: the 7x7 stem conv as a lax convolution or as one patch matmul."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes
from configs import tiny
from ddetr_jax import errors
from ddetr_jax.models import build_model
from ddetr_jax.models.backbone import ResNet


def _conv_kernel_shapes(fn, *args) -> list:
  """Kernel shapes of the lax convolutions in fn's jaxpr (nested jaxprs included)."""
  shapes_found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        shapes_found.append(tuple(eqn.invars[1].aval.shape))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes_found


def test_matmul_stem_is_the_same_network():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 40, 36, 3)), jnp.float32)
  conv_net, matmul_net = ResNet(depth=18, width=16, stem_impl="xla"), ResNet(depth=18, width=16,
                                                                              stem_impl="matmul")
  params = jax.jit(conv_net.init)(jax.random.key(0), images)  # jit: one compilation, not per op
  # Same parameters, same initialisation: the impl only changes how the stem is computed.
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.jit(matmul_net.init)(jax.random.key(0), images))
  # The stem's 7x7 kernel is a convolution in one network and gone from the other's convolutions.
  assert (7, 7, 3, 16) in _conv_kernel_shapes(lambda x: conv_net.apply(params, x), images)
  assert (7, 7, 3, 16) not in _conv_kernel_shapes(lambda x: matmul_net.apply(params, x), images)
  want = jax.jit(conv_net.apply)(params, images)
  got = jax.jit(matmul_net.apply)(params, images)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  # And the stem kernel's gradient (the shapes demo trains the stem) agrees too.
  loss = lambda net: lambda p: sum(jnp.sum(o ** 2) for o in net.apply(p, images))
  want_grad = jax.jit(jax.grad(loss(conv_net)))(params)["params"]["conv1"]["kernel"]
  got_grad = jax.jit(jax.grad(loss(matmul_net)))(params)["params"]["conv1"]["kernel"]
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-3 * float(jnp.abs(want_grad).max()))


def test_config_key_reaches_the_backbone():
  assert tiny.get_config("default").model.backbone_stem_impl == "auto"
  config = shapes.get_config()
  assert config.model.backbone_stem_impl == "matmul"
  model = build_model(config)
  images, mask = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, mask)
  width = config.model.backbone_width
  kernels = _conv_kernel_shapes(lambda v: model.apply(v, images, mask), variables)
  assert (7, 7, 3, width) not in kernels
  config.model.backbone_stem_impl = "xla"
  kernels = _conv_kernel_shapes(lambda v: build_model(config).apply(v, images, mask), variables)
  assert (7, 7, 3, width) in kernels


def test_bad_stem_impl_names_the_key_and_value():
  config = tiny.get_config("default")
  config.model.backbone_stem_impl = "im2col"
  with pytest.raises(errors.InvalidInputError, match="model.backbone_stem_impl .*'im2col'"):
    build_model(config).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                             jnp.zeros((1, 64, 64), bool))
