"""Post-processing against HF transformers' DeformableDetr `post_process_object_detection`."""
import types

import jax
import numpy as np
import pytest
import torch
from transformers.models.deformable_detr.image_processing_pil_deformable_detr import (
    DeformableDetrImageProcessorPil)

from ddetr_jax.postprocess import postprocess


def _hf_postprocess(logits: np.ndarray, boxes: np.ndarray, orig_size: np.ndarray, top_k: int):
  outputs = types.SimpleNamespace(logits=torch.from_numpy(logits),
                                  pred_boxes=torch.from_numpy(boxes))
  return DeformableDetrImageProcessorPil().post_process_object_detection(
      outputs, threshold=-1.0, target_sizes=torch.from_numpy(orig_size), top_k=top_k)


@pytest.mark.parametrize("num_queries,num_classes,top_k", [(300, 91, 100), (7, 3, 100)])
def test_matches_hf_post_process(num_queries, num_classes, top_k):
  rng = np.random.default_rng(0)
  batch = 3
  logits = rng.normal(0, 3, (batch, num_queries, num_classes)).astype(np.float32)
  boxes = rng.uniform(0.05, 0.95, (batch, num_queries, 4)).astype(np.float32)
  orig_size = np.array([[480, 640], [800, 1201], [33, 17]], np.int64)
  ours = jax.jit(postprocess, static_argnums=3)(logits, boxes, orig_size, top_k)
  expected = _hf_postprocess(logits, boxes, orig_size, top_k)
  assert ours["scores"].shape == (batch, min(top_k, num_queries * num_classes))
  for i, ref in enumerate(expected):
    np.testing.assert_allclose(np.asarray(ours["scores"][i]), ref["scores"].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ours["labels"][i]), ref["labels"].numpy())
    np.testing.assert_allclose(np.asarray(ours["boxes"][i]), ref["boxes"].numpy(), rtol=1e-5,
                               atol=1e-3)


def test_hand_computed_case():
  # One image 100 (h) x 200 (w), two queries, two classes.
  logits = np.array([[[0.0, 2.0], [-1.0, 1.0]]], np.float32)
  boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]], np.float32)
  out = postprocess(logits, boxes, np.array([[100, 200]]), num_top=3)
  sig = lambda x: 1 / (1 + np.exp(-x))
  np.testing.assert_allclose(out["scores"][0], [sig(2.0), sig(1.0), sig(0.0)], rtol=1e-6)
  np.testing.assert_array_equal(out["labels"][0], [1, 1, 0])
  np.testing.assert_array_equal(out["query"][0], [0, 1, 0])
  np.testing.assert_allclose(out["boxes"][0], [[80, 30, 120, 70], [0, 50, 100, 100],
                                               [80, 30, 120, 70]], atol=1e-4)


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match=r"orig_size must be \[B, 2\]"):
    postprocess(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match="pred_boxes"):
    postprocess(np.zeros((2, 3, 4)), np.zeros((2, 5, 4)), np.zeros((2, 2)))
