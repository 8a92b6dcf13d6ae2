"""Box conversions, IoU and generalized IoU (GIoU).

Boxes are float arrays whose last axis holds 4 coordinates, either
`cxcywh` (centre x, centre y, width, height) or `xyxy` (x0, y0, x1, y1).
Leading axes are free batch axes.

Degenerate boxes (zero width or height, e.g. the zero boxes in padded target
slots) never produce NaN or infinite values here, nor NaN gradients:
  * IoU is 0 where the union area is 0 (two zero-area boxes);
  * GIoU is the IoU where the enclosing box has area 0 (two identical points
    or segments), so two identical zero-area boxes have GIoU 0, not NaN.
Boxes with x1 < x0 or y1 < y0 are invalid input (the official code asserts);
they are not checked here because this runs inside `jit`.
"""
from typing import Tuple

import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """(cx, cy, w, h) -> (x0, y0, x1, y1); boxes [..., 4] -> [..., 4]."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
  """(x0, y0, x1, y1) -> (cx, cy, w, h); boxes [..., 4] -> [..., 4]."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Area of xyxy boxes [..., 4] -> [...]."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _safe_divide(numerator: jnp.ndarray, denominator: jnp.ndarray) -> jnp.ndarray:
  """numerator / denominator, and 0 (with zero gradient) where denominator <= 0."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _iou_union_enclosure(boxes1: jnp.ndarray, boxes2: jnp.ndarray
                         ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """IoU, union area and enclosing-box area of broadcastable xyxy boxes [..., 4]."""
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  top_left = jnp.maximum(boxes1[..., :2], boxes2[..., :2])             # [..., 2]
  bottom_right = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])         # [..., 2]
  wh = jnp.clip(bottom_right - top_left, 0.0)                          # [..., 2]
  intersection = wh[..., 0] * wh[..., 1]                               # [...]
  union = area1 + area2 - intersection                                 # [...]
  iou = _safe_divide(intersection, union)
  enclose_wh = jnp.clip(jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
                        - jnp.minimum(boxes1[..., :2], boxes2[..., :2]), 0.0)
  enclosure = enclose_wh[..., 0] * enclose_wh[..., 1]                  # [...]
  return iou, union, enclosure


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Pairwise IoU and union of xyxy boxes.

  Args:
    boxes1: [..., N, 4] xyxy.
    boxes2: [..., M, 4] xyxy (same leading axes as boxes1).

  Returns:
    (iou, union), both [..., N, M].
  """
  iou, union, _ = _iou_union_enclosure(boxes1[..., :, None, :], boxes2[..., None, :, :])
  return iou, union


def generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
  """Pairwise GIoU of xyxy boxes: [..., N, 4], [..., M, 4] -> [..., N, M] in [-1, 1]."""
  return elementwise_generalized_box_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])


def elementwise_generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
  """GIoU of corresponding (broadcastable) xyxy boxes: [..., 4], [..., 4] -> [...]."""
  iou, union, enclosure = _iou_union_enclosure(boxes1, boxes2)
  return iou - _safe_divide(enclosure - union, enclosure)
