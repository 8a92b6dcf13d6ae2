"""`model.backbone_width`: a narrower ResNet (stem and stage widths scaled) for small CPU runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ddetr_jax import convert
from ddetr_jax.models import build_model
from ddetr_jax.models.backbone import ResNet, stage_channels


def test_torchvision_widths_by_default():
  # torchvision: ResNet-18/34 stages have 64..512 channels, ResNet-50/101 256..2048.
  assert stage_channels(18) == (64, 128, 256, 512)
  assert stage_channels(50) == (256, 512, 1024, 2048)
  assert stage_channels(101, 64) == (256, 512, 1024, 2048)


@pytest.mark.parametrize("depth,width,channels", [(18, 32, (64, 128, 256)),
                                                  (50, 16, (128, 256, 512))])
def test_narrow_resnet_shapes(depth, width, channels):
  images = jnp.ones((2, 64, 48, 3))
  net = ResNet(depth=depth, width=width)
  params = jax.jit(net.init)(jax.random.key(0), images)["params"]
  assert params["conv1"]["kernel"].shape == (7, 7, 3, width)
  outputs = jax.jit(net.apply)({"params": params}, images)
  # Same strides (8, 16, 32) as the torchvision network; channels scaled by width / 64.
  assert [o.shape for o in outputs] == [(2, 8, 6, channels[0]), (2, 4, 3, channels[1]),
                                        (2, 2, 2, channels[2])]
  assert stage_channels(depth, width)[1:] == channels
  full = jax.eval_shape(ResNet(depth=depth).init, jax.random.key(0), images)["params"]
  count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
  # Convolutions dominate the parameter count and scale with width squared.
  assert 0.2 < count(params) / count(full) * (64 / width) ** 2 / 4 < 0.3


@pytest.mark.parametrize("width", [0, 12, 33, -8])
def test_bad_width_is_an_error(width):
  with pytest.raises(ValueError, match=f"backbone_width must be a positive multiple of 8, got {width}"):
    ResNet(depth=18, width=width).init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))


def test_detector_with_narrow_backbone_and_torch_weights_refused():
  config = tiny.get_config("default")
  config.model.backbone_width = 32
  model = build_model(config)
  images = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  mask = jnp.zeros((1, 64, 64), bool)
  params = jax.jit(model.init)(jax.random.key(2), images, mask)  # jit: one compilation, not per op
  assert params["params"]["backbone"]["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 256, 256)
  out = jax.jit(model.apply)(params, images, mask)
  assert np.all(np.isfinite(out["pred_boxes"]))
  with pytest.raises(convert.CheckpointError, match="backbone_width=32"):
    convert.params_from_state_dict({}, config)
