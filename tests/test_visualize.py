"""Visualisation: the plotted sampling points are the ones the attention operator actually used,
detections are drawn where they are, and `predict_files` writes the pictures of a real model."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from ddetr_jax import predict
from ddetr_jax import visualize
from ddetr_jax.models import build_model
from ddetr_jax.models import deformable_attention


@pytest.fixture(scope="module")
def detector():
  """A tiny box-refinement detector (4-d references) with 2 decoder layers, randomly initialised."""
  config = tiny.get_config("box_refine")
  config.model.enc_layers = 1
  config.eval.num_top = 10
  model = build_model(config)
  image = np.zeros((1, 64, 64, 3), np.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), image, np.zeros((1, 64, 64), bool))
  return config, model, params["params"]


def _images(config):
  """A non-square random image (resized and padded like validation) -> its one-image batch."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)
  return image, predict.image_batch(image, config)


def test_plotted_points_are_the_operators_sampling_locations(detector, monkeypatch, tmp_path):
  """predict_files on a real model: every plotted point is a location the operator sampled."""
  config, model, params = detector
  image, batch = _images(config)
  assert batch["padding_mask"].any()  # the resized image does not fill its bucket
  Image.fromarray(image).save(tmp_path / "street.png")
  op_calls = []  # (spatial_shapes, sampling_locations, attention_weights), in program order
  # The module calls the operator through one of these names (a jitted wrapper, or the function).
  op_name = next(n for n in ("_ms_deform_attn", "ms_deform_attn") if hasattr(deformable_attention, n))
  real_op = getattr(deformable_attention, op_name)
  arg_names = ("value", "spatial_shapes", "sampling_locations", "attention_weights", "impl")

  def recording_op(*args, **kwargs):
    bound = dict(zip(arg_names, args), **kwargs)
    jax.debug.callback(
        lambda loc, w, shapes=bound["spatial_shapes"]: op_calls.append(
            (shapes, np.asarray(loc), np.asarray(w))),
        bound["sampling_locations"], bound["attention_weights"], ordered=True)
    return real_op(*args, **kwargs)

  plots = []
  real_plot = visualize.plot_sampling_points

  def recording_plot(*args, **kwargs):
    drawn = real_plot(*args, **kwargs)
    plots.append(drawn)
    return drawn

  monkeypatch.setattr(deformable_attention, op_name, recording_op)
  monkeypatch.setattr(visualize, "plot_sampling_points", recording_plot)
  summary = predict.predict_files(model, params, config, [str(tmp_path / "*.png")],
                                  str(tmp_path / "out"), threshold=0.0, num_attention=2,
                                  class_names=["a", "b", "c", "d", "e"])
  # 1 encoder layer + 2 decoder layers; the last call is the last decoder layer.
  assert len(op_calls) == 3
  _, op_locations, op_weights = op_calls[-1]
  q, m, l, p = config.model.num_queries, config.model.nheads, config.model.num_feature_levels, 4
  assert op_locations.shape == (1, q, m, l, p, 2)
  (entry,) = summary["images"]
  assert len(plots) == 2 and len(entry["attention"]) == 2
  padded, size = batch["images"].shape[1:3], batch["size"][0]
  # Independent conversion: normalised over the padded input -> resized pixels -> original.
  scale = np.array([padded[1] / size[1] * image.shape[1], padded[0] / size[0] * image.shape[0]])
  for drawn, detection in zip(plots, entry["detections"]):
    locations = op_locations[0, detection["query"]].astype(np.float64)  # [M, L, P, 2]
    weights = op_weights[0, detection["query"]]  # [M, L, P]
    for level in range(l):
      for head in range(m):
        for point in range(p):
          np.testing.assert_allclose(drawn["points"][level, head * p + point],
                                     locations[head, level, point] * scale, rtol=0, atol=1e-4)
          assert drawn["weights"][level, head * p + point] == pytest.approx(
              float(weights[head, level, point]), abs=1e-7)
  # The files.
  assert len(entry["detections"]) == config.eval.num_top
  scores = [d["score"] for d in entry["detections"]]
  assert scores == sorted(scores, reverse=True)
  with Image.open(tmp_path / "out" / "street.jpg") as annotated:
    assert annotated.size == (90, 50)
  for path in entry["attention"]:
    with Image.open(path) as picture:
      assert picture.format == "PNG" and picture.width > picture.height > 100
  assert json.loads((tmp_path / "out" / "detections.json").read_text()) == summary


def test_draw_detections_boxes_and_threshold():
  image = np.zeros((60, 80, 3), np.uint8)
  boxes = np.array([[10.0, 20.0, 50.0, 55.0], [0.0, 0.0, 79.0, 59.0]])
  picture = np.asarray(visualize.draw_detections(image, boxes, np.array([2, 4]),
                                                 np.array([0.9, 0.2]), ["a", "b", "c"], 0.5))
  color = visualize.class_color(2)
  assert tuple(picture[40, 10]) == color and tuple(picture[40, 50]) == color  # left/right edges
  assert tuple(picture[55, 30]) == color  # bottom edge
  assert not picture[40, 0].any() and not picture[59, 40].any()  # the 0.2 box is not drawn
  assert not picture[40, 30].any()  # inside the box stays untouched
  assert picture[:20].any()  # the label sits above the box
