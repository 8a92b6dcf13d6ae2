"""`model.backbone_norm='group'`: a trainable GroupNorm ResNet for training from scratch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import tiny
from ddetr_jax import convert, optim
from ddetr_jax.models import build_model
from ddetr_jax.models import backbone
from ddetr_jax.models.backbone import BasicBlock, Bottleneck, ResNet


def _flat(tree):
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_group_norm_layout_names_and_labels():
  params = ResNet(depth=18, norm="group").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  flat = _flat(params["params"])
  assert "layer2_0/gn1/scale" in flat and "layer2_0/downsample_gn/bias" in flat
  assert not any("bn" in path or path.endswith(("/mean", "/var")) for path in flat)
  # Every GroupNorm trains with the backbone (frozen BatchNorm never does).
  detector_params = {"params": {"backbone": params["params"]}}
  labels = _flat(optim.param_labels(detector_params, freeze_stem=False))
  assert labels["params/backbone/gn1/scale"] == "backbone"
  assert labels["params/backbone/layer3_1/gn2/bias"] == "backbone"
  official = _flat(optim.param_labels(detector_params))
  assert official["params/backbone/layer1_0/gn1/scale"] == "frozen"
  assert official["params/backbone/layer2_0/gn1/scale"] == "backbone"


@pytest.mark.parametrize("block,channels", [(BasicBlock, 16), (Bottleneck, 64)])
def test_residual_branch_starts_at_zero(block, channels):
  # The last GroupNorm of each branch starts with zero scale, so a block without downsampling
  # is relu(x) at initialisation.
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, channels))
  module = block(planes=16, norm="group")
  params = module.init(jax.random.key(2), x)
  np.testing.assert_allclose(module.apply(params, x), jax.nn.relu(x), atol=1e-6)


def test_group_norm_matches_torch():
  # The backbone's GroupNorm normalises like torch.nn.GroupNorm(32, C, eps=1e-5).
  x = jax.random.normal(jax.random.key(3), (2, 6, 5, 64)) * 3 + 1
  norm = backbone._norm("group", 64, "bn1", jnp.float32)
  assert norm.name == "gn1"
  scale = jax.random.normal(jax.random.key(5), (64,))
  bias = jax.random.normal(jax.random.key(6), (64,))
  out = norm.apply({"params": {"scale": scale, "bias": bias}}, x)
  gn = torch.nn.GroupNorm(32, 64, eps=1e-5)
  with torch.no_grad():
    gn.weight.copy_(torch.from_numpy(np.array(scale)))
    gn.bias.copy_(torch.from_numpy(np.array(bias)))
    expected = gn(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


def test_detector_with_group_norm_and_torch_weights_refused():
  config = tiny.get_config("default")
  config.model.backbone_norm = "group"
  model = build_model(config)
  images = jax.random.normal(jax.random.key(7), (1, 64, 64, 3))
  mask = jnp.zeros((1, 64, 64), bool)
  params = jax.jit(model.init)(jax.random.key(8), images, mask)  # jit: one compilation, not per op
  out = jax.jit(model.apply)(params, images, mask)
  assert np.all(np.isfinite(out["pred_boxes"]))
  with pytest.raises(convert.CheckpointError, match="backbone_norm='group'"):
    convert.params_from_state_dict({}, config)
  config.model.backbone_norm = "batch"
  with pytest.raises(ValueError, match="backbone_norm must be one of"):
    build_model(config).init(jax.random.key(8), images, jnp.zeros((1, 64, 64), bool))
