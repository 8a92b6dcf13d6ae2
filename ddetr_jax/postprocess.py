"""Official Deformable DETR post-processing: model outputs -> scored boxes in image pixels.

Sigmoid scores, the `num_top` best (query, class) pairs of each image, label = index % classes,
boxes converted from normalised cxcywh to xyxy pixels of the original image. Jittable; every
shape is static, so it runs on device right after the forward pass.
"""
import jax
import jax.numpy as jnp

from ddetr_jax import box_ops


def postprocess(pred_logits: jax.Array, pred_boxes: jax.Array, orig_size: jax.Array,
                num_top: int = 100) -> dict[str, jax.Array]:
  """Top-`num_top` detections per image over queries x classes.

  Args:
    pred_logits: [B, Q, C] classification logits (sigmoid, no background class).
    pred_boxes: [B, Q, 4] normalised (cx, cy, w, h) in [0, 1], relative to the unpadded image.
    orig_size: [B, 2] (height, width) of the original images, in pixels.
    num_top: detections kept per image (static); at most Q * C are returned.
  Returns dict:
    `scores` [B, K] float32 sigmoid probabilities, descending;
    `labels` [B, K] int32 class (label) ids in [0, C);
    `boxes`  [B, K, 4] float32 (x0, y0, x1, y1) in original-image pixels;
    `query`  [B, K] int32 index of the query each detection comes from;
    with K = min(num_top, Q * C).
  """
  if pred_logits.ndim != 3 or pred_boxes.shape != pred_logits.shape[:2] + (4,):
    raise ValueError(f"pred_logits must be [B, Q, C] and pred_boxes [B, Q, 4], got shapes "
                     f"{pred_logits.shape} and {pred_boxes.shape}")
  if orig_size.shape != (pred_logits.shape[0], 2):
    raise ValueError(f"orig_size must be [B, 2] = {(pred_logits.shape[0], 2)}, got shape "
                     f"{orig_size.shape}")
  batch, num_queries, num_classes = pred_logits.shape
  k = min(int(num_top), num_queries * num_classes)
  probs = jax.nn.sigmoid(pred_logits.astype(jnp.float32)).reshape(batch, -1)  # [B, Q*C]
  scores, index = jax.lax.top_k(probs, k)  # [B, K]
  query = index // num_classes  # [B, K]
  labels = index % num_classes  # [B, K]
  boxes = box_ops.box_cxcywh_to_xyxy(pred_boxes.astype(jnp.float32))  # [B, Q, 4]
  boxes = jnp.take_along_axis(boxes, query[..., None], axis=1)  # [B, K, 4]
  height, width = orig_size[:, 0].astype(jnp.float32), orig_size[:, 1].astype(jnp.float32)
  scale = jnp.stack([width, height, width, height], axis=-1)  # [B, 4]
  return {"scores": scores, "labels": labels.astype(jnp.int32), "boxes": boxes * scale[:, None, :],
          "query": query.astype(jnp.int32)}
