"""Initialisation matches the official code's (`models/deformable_transformer.py`,
`models/ops/modules/ms_deform_attn.py`, `models/deformable_detr.py`), checked against
hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from ddetr_jax.models import build_model
from ddetr_jax.models.deformable_attention import MSDeformAttn


def _assert_xavier_uniform(w, fan_in, fan_out):
  """w is a sample of U(-b, b), b = sqrt(6 / (fan_in + fan_out)) (Xavier, gain 1): within the
  bound, reaching near it, with the uniform's standard deviation b / sqrt(3) (to 20%)."""
  bound = math.sqrt(6 / (fan_in + fan_out))
  w = np.asarray(w)
  assert np.abs(w).max() <= bound
  assert np.abs(w).max() > 0.8 * bound
  assert abs(np.std(w) / (bound / math.sqrt(3)) - 1) < 0.2, (np.std(w), bound / math.sqrt(3))


def test_msdeformattn_init():
  module = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
  query = jnp.zeros((1, 3, 256))
  ref = jnp.full((1, 3, 4, 2), 0.5)
  shapes = ((4, 4), (2, 2), (1, 1), (1, 1))
  value = jnp.zeros((1, 22, 256))
  params = module.init(jax.random.key(0), query, ref, value, shapes)["params"]
  # Head h looks along 2*pi*h/8, direction scaled to max-abs 1, times (point + 1).
  directions = np.array([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], np.float32)
  expected = directions[:, None, None, :] * np.arange(1, 5, dtype=np.float32)[None, None, :, None]
  expected = np.broadcast_to(expected, (8, 4, 4, 2)).reshape(-1)
  np.testing.assert_allclose(params["sampling_offsets"]["bias"], expected, atol=1e-5)  # float32 cos/sin
  assert np.all(params["sampling_offsets"]["kernel"] == 0)
  assert np.all(params["attention_weights"]["kernel"] == 0) and np.all(params["attention_weights"]["bias"] == 0)
  bound = math.sqrt(6 / (256 + 256))  # Xavier uniform
  for name in ("value_proj", "output_proj"):
    kernel = np.asarray(params[name]["kernel"])
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
    np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.05)
    assert np.all(params[name]["bias"] == 0)


def test_detector_init_box_refine():
  config = tiny.get_config("box_refine")
  config.model.enc_layers = 1
  config.model.num_feature_levels = 1  # one level keeps the compile short; heads are the same.
  model = build_model(config)
  images, mask = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32), bool)
  params = jax.jit(model.init)(jax.random.key(0), images, mask)["params"]
  prior = -math.log((1 - 0.01) / 0.01)
  # Heads are clones of one initialisation; only head 0 gets bias[2:] = -2.
  c0, c1 = params["class_embed_0"], params["class_embed_1"]
  np.testing.assert_array_equal(c0["kernel"], c1["kernel"])
  np.testing.assert_allclose(c0["bias"], np.full(5, prior), rtol=1e-6)
  bound = 1 / math.sqrt(32)  # PyTorch Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert 0.8 * bound < np.abs(c0["kernel"]).max() <= bound
  b0, b1 = params["bbox_embed_0"], params["bbox_embed_1"]
  for layer in ("layers_0", "layers_1"):
    np.testing.assert_array_equal(b0[layer]["kernel"], b1[layer]["kernel"])
    np.testing.assert_array_equal(b0[layer]["bias"], b1[layer]["bias"])
  assert np.all(b0["layers_2"]["kernel"] == 0) and np.all(b1["layers_2"]["kernel"] == 0)
  np.testing.assert_array_equal(b0["layers_2"]["bias"], [0, 0, -2, -2])
  np.testing.assert_array_equal(b1["layers_2"]["bias"], [0, 0, 0, 0])
  # Input projections: Xavier(gain 1) conv, zero bias; GroupNorm identity.
  kernel = np.asarray(params["input_proj_0"]["conv"]["kernel"])  # (1, 1, 512, 32) from layer4
  assert kernel.shape == (1, 1, 512, 32)
  _assert_xavier_uniform(kernel, fan_in=512, fan_out=32)
  assert np.all(params["input_proj_0"]["conv"]["bias"] == 0)
  # Frozen BatchNorm: identity statistics.
  bn = params["backbone"]["bn1"]
  assert set(bn) == {"scale", "bias", "mean", "var"}
  assert np.all(bn["scale"] == 1) and np.all(bn["var"] == 1) and np.all(bn["mean"] == 0)
  # Decoder self-attention q/k/v: slices of one Xavier (3 * 32, 32) matrix.
  q = np.asarray(params["transformer"]["decoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
  _assert_xavier_uniform(q, fan_in=32, fan_out=96)
  ref = params["transformer"]["reference_points"]
  assert np.all(ref["bias"] == 0)
  _assert_xavier_uniform(np.asarray(ref["kernel"]), fan_in=32, fan_out=2)
  assert 0.5 < np.std(params["query_embed"]) < 1.5  # N(0, 1)
  assert params["query_embed"].shape == (16, 64)


def _tiny_heads(variant: str) -> dict:
  config = tiny.get_config(variant)
  config.model.enc_layers = 1
  model = build_model(config)
  images, mask = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
  params = jax.jit(model.init)(jax.random.key(0), images, mask)["params"]
  heads = {n: p for n, p in params.items() if n.startswith(("class_embed", "bbox_embed"))}
  return heads, config.model.dec_layers


def test_detector_init_shared_heads_without_box_refinement():
  # Official: one class head and one box head shared by every decoder layer, box bias[2:] = -2.
  heads, _ = _tiny_heads("default")
  assert sorted(heads) == ["bbox_embed", "class_embed"]
  np.testing.assert_allclose(heads["class_embed"]["bias"], -math.log((1 - 0.01) / 0.01), rtol=1e-6)
  assert np.all(heads["bbox_embed"]["layers_2"]["kernel"] == 0)
  np.testing.assert_array_equal(heads["bbox_embed"]["layers_2"]["bias"], [0, 0, -2, -2])


def test_detector_init_two_stage_heads():
  # Official: one head pair per decoder layer plus the encoder's (k = dec_layers), all clones;
  # two-stage then sets every box head's bias[2:] back to 0, head 0's included.
  heads, dec_layers = _tiny_heads("two_stage")
  assert sorted(heads) == sorted(f"{kind}_embed_{k}" for kind in ("bbox", "class")
                                 for k in range(dec_layers + 1))
  for k in range(dec_layers + 1):
    np.testing.assert_array_equal(heads[f"bbox_embed_{k}"]["layers_2"]["bias"], [0, 0, 0, 0])
    assert np.all(heads[f"bbox_embed_{k}"]["layers_2"]["kernel"] == 0)
    np.testing.assert_allclose(heads[f"class_embed_{k}"]["bias"], -math.log(99), rtol=1e-6)
    np.testing.assert_array_equal(heads[f"class_embed_{k}"]["kernel"],  # clones of one init
                                  heads["class_embed_0"]["kernel"])
    np.testing.assert_array_equal(heads[f"bbox_embed_{k}"]["layers_0"]["kernel"],
                                  heads["bbox_embed_0"]["layers_0"]["kernel"])
