"""Output parity of the Flax Deformable DETR against HuggingFace transformers (random weights, CPU).

HF's weights are converted with ddetr_jax.convert; both models run on the same padded batch and
every output (final, each aux layer, two-stage encoder outputs) must agree to 1e-4 (float32).
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from configs import deformable_detr, tiny
from ddetr_jax import convert
from ddetr_jax.models import build_model
from tests.test_model_hf_reference import build_hf_model, hf_outputs

TOL = 1e-4


def _padded_batch(h: int = 64, w: int = 96, valid: tuple = (45, 70), seed: int = 0):
  """Two images: one full (h, w), one of size `valid` padded to (h, w) with zeros."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((2, h, w, 3)).astype(np.float32)
  mask = np.zeros((2, h, w), bool)
  mask[1, valid[0]:] = True
  mask[1, :, valid[1]:] = True
  images[mask] = 0.0
  return images, mask


def _max_errors(ours: dict, ref: dict) -> dict:
  assert set(ours) == set(ref), (sorted(ours), sorted(ref))
  return jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), ours, ref)


def _assert_parity(ours: dict, ref: dict, num_aux: int):
  assert len(ref["aux_outputs"]) == num_aux
  errors = _max_errors(ours, ref)
  worst = max(jax.tree_util.tree_leaves(errors))
  assert worst <= TOL, errors
  # Non-trivial outputs: boxes differ between queries and images.
  assert np.std(ref["pred_boxes"]) > 1e-3 and np.std(ref["pred_logits"]) > 1e-2
  return worst


@pytest.mark.parametrize("variant", deformable_detr.VARIANTS)
def test_tiny_variant_matches_hf_on_padded_batch(variant):
  config = tiny.get_config(variant)
  hf = build_hf_model(config.model, seed=1)
  images, mask = _padded_batch()
  ref = hf_outputs(hf, images, mask)
  params = convert.params_from_hf_state_dict(hf.state_dict(), config)
  ours = build_model(config).apply({"params": params}, jnp.asarray(images), jnp.asarray(mask))
  _assert_parity(ours, ref, num_aux=config.model.dec_layers - 1)
  assert ("enc_outputs" in ours) == config.model.two_stage


@pytest.mark.parametrize("depth,channels", [(18, 512), (50, 2048)])
def test_dc5_backbone_has_stride_16(depth, channels):
  from ddetr_jax.models.backbone import ResNet
  x = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  for dilation, size in ((False, (2, 3)), (True, (4, 6))):
    model = ResNet(depth, dilation, (4,))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    (layer4,) = jax.eval_shape(model.apply, params, x)
    assert layer4.shape == (1, *size, channels)


def test_full_size_resnet50_default_matches_hf():
  """Official sizes: ResNet-50, 6 + 6 layers, 300 queries, 91 classes, one 512x683 image."""
  config = deformable_detr.get_config("default")
  hf = build_hf_model(config.model, seed=2)
  rng = np.random.default_rng(3)
  images = rng.standard_normal((1, 512, 683, 3)).astype(np.float32)
  mask = np.zeros((1, 512, 683), bool)
  ref = hf_outputs(hf, images, mask)
  params = convert.params_from_hf_state_dict(hf.state_dict(), config)
  ours = build_model(config).apply({"params": params}, jnp.asarray(images), jnp.asarray(mask))
  assert ours["pred_logits"].shape == (1, 300, 91)
  _assert_parity(ours, ref, num_aux=5)
