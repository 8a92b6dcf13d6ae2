"""The set criterion against HF transformers' DeformableDetr loss and hand-computed cases."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from transformers.loss.loss_deformable_detr import (DeformableDetrHungarianMatcher,
                                                    DeformableDetrImageLoss)

from ddetr_jax import losses


def _loss_config(solver="hungarian"):
  return ml_collections.ConfigDict(dict(
      set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0,
      cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,
      focal_alpha=0.25, focal_gamma=2.0, matcher=solver))


def _random_boxes(rng, shape):
  return np.concatenate([rng.uniform(0.2, 0.8, shape + (2,)),
                         rng.uniform(0.05, 0.4, shape + (2,))], -1).astype(np.float32)


def _random_case(seed, batch=3, num_queries=12, num_classes=7, num_targets=6, num_aux=2,
                 enc_queries=20):
  rng = np.random.default_rng(seed)
  def preds(q):
    return {"pred_logits": rng.normal(size=(batch, q, num_classes)).astype(np.float32) * 2,
            "pred_boxes": _random_boxes(rng, (batch, q))}
  outputs = preds(num_queries)
  outputs["aux_outputs"] = [preds(num_queries) for _ in range(num_aux)]
  outputs["enc_outputs"] = preds(enc_queries)
  box_mask = np.zeros((batch, num_targets), bool)
  box_mask[0, :4] = True
  box_mask[2, :] = True       # image 1 has no targets
  labels = np.where(box_mask, rng.integers(0, num_classes, (batch, num_targets)), 0).astype(np.int32)
  boxes = np.where(box_mask[..., None], _random_boxes(rng, (batch, num_targets)), 0.0)
  batch_dict = {"labels": labels, "boxes": boxes.astype(np.float32), "box_mask": box_mask}
  return outputs, batch_dict


def _hf_terms(preds, batch, num_classes, agnostic=False):
  """HF's loss_ce / loss_bbox / loss_giou for one prediction set (official settings)."""
  criterion = DeformableDetrImageLoss(
      matcher=DeformableDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0),
      num_classes=num_classes, focal_alpha=0.25, losses=["labels", "boxes"])
  targets = []
  for b in range(batch["labels"].shape[0]):
    mask = batch["box_mask"][b]
    labels = torch.from_numpy(batch["labels"][b][mask]).long()
    targets.append({"class_labels": torch.zeros_like(labels) if agnostic else labels,
                    "boxes": torch.from_numpy(batch["boxes"][b][mask])})
  out = criterion({"logits": torch.from_numpy(preds["pred_logits"]),
                   "pred_boxes": torch.from_numpy(preds["pred_boxes"])}, targets)
  return {k: float(v) for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def _jitted_criterion(solver, num_classes):
  return jax.jit(lambda o, b, n=None: losses.set_criterion(o, b, _loss_config(solver), num_classes, n))


@pytest.mark.parametrize("solver", ["hungarian", "scipy"])
def test_terms_match_hf(solver):
  num_classes = 7
  outputs, batch = _random_case(0, num_classes=num_classes)
  total, terms = _jitted_criterion(solver, num_classes)(outputs, batch)
  sets = {"": outputs, "_0": outputs["aux_outputs"][0], "_1": outputs["aux_outputs"][1]}
  expected = {}
  for suffix, preds in sets.items():
    expected.update({k + suffix: v for k, v in _hf_terms(preds, batch, num_classes).items()})
  expected.update({k + "_enc": v for k, v in
                   _hf_terms(outputs["enc_outputs"], batch, num_classes, agnostic=True).items()})
  assert set(terms) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(float(terms[name]), value, rtol=1e-5, atol=1e-5, err_msg=name)
  coef = {"ce": 2.0, "bbox": 5.0, "giou": 2.0}
  weighted = sum(coef[name.split("_")[1]] * value for name, value in expected.items())
  np.testing.assert_allclose(float(total), weighted, rtol=1e-5)


def test_hand_computed_single_box():
  # 2 queries, 2 classes, 1 target of class 1 with box equal to query 0's box.
  logits = np.zeros((1, 2, 2), np.float32)          # p = 0.5 everywhere
  pred_boxes = np.array([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]], np.float32)
  batch = {"labels": np.array([[1, 0]], np.int32),
           "boxes": np.array([[[0.5, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]]], np.float32),
           "box_mask": np.array([[True, False]])}
  total, terms = _jitted_criterion("hungarian", 2)(
      {"pred_logits": logits, "pred_boxes": pred_boxes}, batch)
  # Focal at p = 0.5: ce = log 2, (1 - p_t)^2 = 1/4; one positive (alpha 0.25), three negatives (0.75).
  ce = (0.25 + 3 * 0.75) * math.log(2) * 0.25
  np.testing.assert_allclose(float(terms["loss_ce"]), ce, rtol=1e-6)
  np.testing.assert_allclose(float(terms["loss_bbox"]), 0.0, atol=1e-7)
  np.testing.assert_allclose(float(terms["loss_giou"]), 0.0, atol=1e-6)
  np.testing.assert_allclose(float(total), 2.0 * ce, rtol=1e-6)
  # Shift the target: L1 = 0.1 + 0.1; boxes [0.4,0.6] vs [0.5,0.7] per axis:
  # inter 0.01, union 0.07, enclosure 0.09 -> GIoU = 1/7 - 2/9.
  batch["boxes"][0, 0] = [0.6, 0.6, 0.2, 0.2]
  _, terms = _jitted_criterion("hungarian", 2)(
      {"pred_logits": logits, "pred_boxes": pred_boxes}, batch)
  np.testing.assert_allclose(float(terms["loss_bbox"]), 0.2, rtol=1e-5)
  np.testing.assert_allclose(float(terms["loss_giou"]), 1 - (1 / 7 - 2 / 9), rtol=1e-5)


def test_no_targets_and_num_boxes_override_and_gradients():
  outputs, batch = _random_case(1, num_aux=0)
  outputs.pop("enc_outputs")
  empty = dict(batch, box_mask=np.zeros_like(batch["box_mask"]))
  criterion = _jitted_criterion("hungarian", 7)
  _, terms = criterion(outputs, empty)
  assert float(terms["loss_bbox"]) == 0.0 and float(terms["loss_giou"]) == 0.0
  # No positives, num_boxes clamped to 1: the sum of (1 - alpha) p^2 * -log(1 - p).
  prob = 1 / (1 + np.exp(-outputs["pred_logits"].astype(np.float64)))
  np.testing.assert_allclose(float(terms["loss_ce"]),
                             (0.75 * prob**2 * -np.log1p(-prob)).sum(), rtol=1e-5)
  # An explicit global num_boxes rescales every term.
  _, base = criterion(outputs, batch)
  _, scaled = criterion(outputs, batch, 20.0)
  n = batch["box_mask"].sum()
  for name in base:
    np.testing.assert_allclose(float(scaled[name]) * 20.0, float(base[name]) * n, rtol=1e-5)
  # Gradients are finite (padded zero boxes, empty images) and reach only the inputs.
  grads = jax.jit(jax.grad(lambda o: losses.set_criterion(o, batch, _loss_config(), 7)[0]))(outputs)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert np.any(np.asarray(grads["pred_boxes"]) != 0)


def test_bad_inputs_are_named():
  outputs, batch = _random_case(2, num_aux=0)
  with pytest.raises(ValueError, match="num_classes=5"):
    losses.set_criterion(outputs, batch, _loss_config(), num_classes=5)
  with pytest.raises(KeyError, match="box_mask"):
    losses.set_criterion(outputs, {"labels": batch["labels"], "boxes": batch["boxes"]},
                         _loss_config(), num_classes=7)
