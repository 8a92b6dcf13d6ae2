"""box_ops against HF transformers' (torch) box utilities and hand-computed cases."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.image_transforms import center_to_corners_format, corners_to_center_format
from transformers.loss import loss_for_object_detection as hf

from ddetr_jax import box_ops


def _random_cxcywh(rng, n):
  return np.concatenate([rng.uniform(0.1, 0.9, (n, 2)), rng.uniform(0.05, 0.5, (n, 2))],
                        -1).astype(np.float32)


def test_conversions_match_hf_and_roundtrip():
  rng = np.random.default_rng(0)
  boxes = _random_cxcywh(rng, 20)
  xyxy = np.asarray(box_ops.box_cxcywh_to_xyxy(jnp.asarray(boxes)))
  np.testing.assert_allclose(xyxy, center_to_corners_format(torch.from_numpy(boxes)).numpy(),
                             atol=1e-7)
  back = np.asarray(box_ops.box_xyxy_to_cxcywh(jnp.asarray(xyxy)))
  np.testing.assert_allclose(back, corners_to_center_format(torch.from_numpy(xyxy.copy())).numpy(),
                             atol=1e-7)
  np.testing.assert_allclose(back, boxes, atol=1e-6)
  # Leading batch axes are preserved.
  assert box_ops.box_cxcywh_to_xyxy(jnp.zeros((2, 3, 4))).shape == (2, 3, 4)


def test_pairwise_iou_giou_match_hf():
  rng = np.random.default_rng(1)
  a = center_to_corners_format(torch.from_numpy(_random_cxcywh(rng, 7)))
  b = center_to_corners_format(torch.from_numpy(_random_cxcywh(rng, 5)))
  iou, union = box_ops.box_iou(jnp.asarray(a.numpy()), jnp.asarray(b.numpy()))
  ref_iou, ref_union = hf.box_iou(a, b)
  np.testing.assert_allclose(np.asarray(iou), ref_iou.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(union), ref_union.numpy(), atol=1e-6)
  giou = box_ops.generalized_box_iou(jnp.asarray(a.numpy()), jnp.asarray(b.numpy()))
  np.testing.assert_allclose(np.asarray(giou), hf.generalized_box_iou(a, b).numpy(), atol=1e-6)
  # Element-wise equals the diagonal of the pairwise matrix.
  elem = box_ops.elementwise_generalized_box_iou(jnp.asarray(a.numpy()[:5]), jnp.asarray(b.numpy()))
  np.testing.assert_allclose(np.asarray(elem), np.diag(hf.generalized_box_iou(a[:5], b).numpy()),
                             atol=1e-6)


def test_hand_computed_cases():
  boxes1 = jnp.array([[0., 0., 1., 1.], [0., 0., 2., 2.], [0., 0., 1., 1.], [0., 0., 2., 1.]])
  boxes2 = jnp.array([[0., 0., 1., 1.], [0., 0., 1., 1.], [2., 0., 3., 1.], [1., 0., 3., 1.]])
  giou = np.asarray(box_ops.elementwise_generalized_box_iou(boxes1, boxes2))
  # identical: 1; contained (area 1 of 4, enclosure = union): 0.25;
  # disjoint (union 2, enclosure 3): -1/3; half overlap (inter 1, union 3, enclosure 3): 1/3.
  np.testing.assert_allclose(giou, [1.0, 0.25, -1.0 / 3.0, 1.0 / 3.0], atol=1e-6)
  iou, union = box_ops.box_iou(boxes1, boxes2)
  np.testing.assert_allclose(np.diag(np.asarray(iou)), [1.0, 0.25, 0.0, 1.0 / 3.0], atol=1e-6)
  np.testing.assert_allclose(np.diag(np.asarray(union)), [1.0, 4.0, 2.0, 3.0], atol=1e-6)


def test_degenerate_boxes_are_finite_with_finite_gradients():
  point = jnp.array([0.5, 0.5, 0.0, 0.0])       # cxcywh, zero area
  segment = jnp.array([0.5, 0.5, 0.2, 0.0])     # zero height
  normal = jnp.array([0.4, 0.4, 0.2, 0.2])
  zero = jnp.zeros(4)                           # a padded target slot
  pairs = [(point, point), (zero, zero), (segment, segment), (point, normal), (normal, zero),
           (segment, point)]

  def giou(x, y):
    return box_ops.elementwise_generalized_box_iou(box_ops.box_cxcywh_to_xyxy(x),
                                                   box_ops.box_cxcywh_to_xyxy(y))

  values = np.array([float(giou(x, y)) for x, y in pairs])
  assert np.all(np.isfinite(values)), values
  # Identical zero-area boxes: union and enclosure are 0 -> GIoU defined as 0.
  np.testing.assert_allclose(values[:3], 0.0)
  # A point inside a normal box: IoU 0, enclosure = union = the normal box -> GIoU 0.
  np.testing.assert_allclose(values[3], 0.0, atol=1e-7)
  # A normal box against the zero box at the origin: union 0.04, enclosure 0.5 * 0.5.
  np.testing.assert_allclose(values[4], -(0.25 - 0.04) / 0.25, atol=1e-6)
  # A segment and a point on it: union and intersection 0, enclosure 0 -> 0.
  np.testing.assert_allclose(values[5], 0.0)
  for x, y in pairs:
    grads = jax.grad(giou, argnums=(0, 1))(x, y)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  _, union = box_ops.box_iou(jnp.zeros((2, 4)), jnp.zeros((3, 4)))
  assert union.shape == (2, 3) and np.all(np.asarray(union) == 0)
