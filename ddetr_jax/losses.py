"""The Deformable DETR set-prediction loss (official SetCriterion, fixed shapes).

For each prediction set (final decoder layer, every earlier layer in `aux_outputs`, and the
two-stage encoder proposals in `enc_outputs`) the matcher assigns queries to targets, then:
  loss_ce   = sum over all queries x classes of the sigmoid focal loss (alpha, gamma) with
              one-hot targets for matched queries (unmatched queries: all zeros) / num_boxes;
  loss_bbox = sum over matched pairs of L1(pred cxcywh, target cxcywh) / num_boxes;
  loss_giou = sum over matched pairs of 1 - GIoU / num_boxes.
Term names: `loss_ce`, `loss_bbox`, `loss_giou` for the final layer, `..._{i}` for decoder
layer i of `aux_outputs`, `..._enc` for the encoder (all target labels set to 0, i.e.
class-agnostic). total = sum of cls_loss_coef * loss_ce* + bbox_loss_coef * loss_bbox* +
giou_loss_coef * loss_giou*.

num_boxes: the official code divides by (total real targets over all devices) / world size on
each device and then averages gradients over devices, which equals the global sum of the
per-box terms / total real targets. With one jitted step on the global batch this is just
`box_mask.sum()` over the global batch (XLA inserts the cross-device reduction); clamped at 1.
A caller that computes the loss per shard (e.g. inside `shard_map`) passes the global
`num_boxes` explicitly. (The official clamp is max(total / world, 1), which differs only when an
entire global batch has fewer targets than devices.)
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from ddetr_jax import box_ops
from ddetr_jax import matcher as matcher_lib


def sigmoid_focal_loss(logits: jnp.ndarray, targets: jnp.ndarray,
                       alpha: float = 0.25, gamma: float = 2.0) -> jnp.ndarray:
  """Element-wise sigmoid focal loss (RetinaNet), not reduced.

  Args:
    logits: [...] logits.
    targets: [...] binary targets (0 or 1), same shape.
    alpha: weight of positives (negatives get 1 - alpha); alpha < 0 disables it.
    gamma: focusing exponent.

  Returns:
    [...] loss per element.
  """
  logits = logits.astype(jnp.float32)
  prob = jax.nn.sigmoid(logits)
  # Stable binary cross-entropy with logits.
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = prob * targets + (1 - prob) * (1 - targets)
  loss = ce * (1 - p_t)**gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


def _single_set_losses(pred_logits: jnp.ndarray, pred_boxes: jnp.ndarray,
                       labels: jnp.ndarray, boxes: jnp.ndarray, box_mask: jnp.ndarray,
                       num_boxes: jnp.ndarray, loss_config: Any) -> Dict[str, jnp.ndarray]:
  """Matches one prediction set and returns its unweighted loss_ce, loss_bbox, loss_giou.

  Args:
    pred_logits: [B, Q, C]; pred_boxes: [B, Q, 4] cxcywh.
    labels: [B, T] int; boxes: [B, T, 4] cxcywh; box_mask: [B, T] bool.
    num_boxes: scalar normaliser.
  """
  num_queries, num_classes = pred_logits.shape[1:]
  query_index, matched = matcher_lib.match(
      pred_logits, pred_boxes, labels, boxes, box_mask,
      cost_class=loss_config.set_cost_class, cost_bbox=loss_config.set_cost_bbox,
      cost_giou=loss_config.set_cost_giou, focal_alpha=loss_config.focal_alpha,
      focal_gamma=loss_config.focal_gamma, solver=loss_config.matcher)  # [B, T] each
  weight = matched.astype(jnp.float32)                                         # [B, T]

  # Classification: one-hot targets on matched queries, zeros elsewhere.
  assignment = jax.nn.one_hot(query_index, num_queries) * weight[..., None]    # [B, T, Q]
  label_onehot = jax.nn.one_hot(labels, num_classes)                           # [B, T, C]
  class_targets = jnp.einsum("btq,btc->bqc", assignment, label_onehot,
                             precision=jax.lax.Precision.HIGHEST)              # [B, Q, C]
  focal = sigmoid_focal_loss(pred_logits, class_targets,
                             loss_config.focal_alpha, loss_config.focal_gamma)  # [B, Q, C]
  loss_ce = focal.sum() / num_boxes

  # Boxes: matched prediction for every target slot; padded slots get a harmless dummy box.
  matched_boxes = jnp.take_along_axis(
      pred_boxes.astype(jnp.float32), query_index[..., None], axis=1)          # [B, T, 4]
  dummy = jnp.array([0.5, 0.5, 1.0, 1.0], jnp.float32)
  target_boxes = jnp.where(matched[..., None], boxes.astype(jnp.float32), dummy)  # [B, T, 4]
  l1 = jnp.abs(matched_boxes - target_boxes).sum(-1)                           # [B, T]
  giou = box_ops.elementwise_generalized_box_iou(
      box_ops.box_cxcywh_to_xyxy(matched_boxes),
      box_ops.box_cxcywh_to_xyxy(target_boxes))                                # [B, T]
  loss_bbox = (l1 * weight).sum() / num_boxes
  loss_giou = ((1 - giou) * weight).sum() / num_boxes
  return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}


def set_criterion(outputs: Mapping[str, Any], batch: Mapping[str, Any], loss_config: Any,
                  num_classes: int, num_boxes: Optional[jnp.ndarray] = None
                  ) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """Total weighted loss and the unweighted named terms; usable inside `jit`.

  Args:
    outputs: model outputs: `pred_logits` [B, Q, C], `pred_boxes` [B, Q, 4] cxcywh; optional
      `aux_outputs` (list of dicts with the same keys, one per earlier decoder layer) and
      `enc_outputs` (dict with the same keys, two-stage encoder proposals, any Q).
    batch: `labels` [B, T] int, `boxes` [B, T, 4] normalized cxcywh, `box_mask` [B, T] bool
      (other keys ignored).
    loss_config: config.loss: set_cost_class/bbox/giou, cls/bbox/giou_loss_coef,
      focal_alpha, focal_gamma, matcher.
    num_classes: C; checked against pred_logits.
    num_boxes: optional global number of real targets (already summed over devices);
      default `batch['box_mask'].sum()`. Clamped at >= 1.

  Returns:
    (total_loss scalar, {term name: scalar}) with names as in the module docstring.
  """
  for key in ("pred_logits", "pred_boxes"):
    if key not in outputs:
      raise KeyError(f"set_criterion: outputs lack {key!r}; got keys {sorted(outputs)}")
  for key in ("labels", "boxes", "box_mask"):
    if key not in batch:
      raise KeyError(f"set_criterion: batch lacks {key!r}; got keys {sorted(batch)}")
  if outputs["pred_logits"].shape[-1] != num_classes:
    raise ValueError(f"set_criterion: pred_logits has {outputs['pred_logits'].shape[-1]} "
                     f"classes (shape {outputs['pred_logits'].shape}) but num_classes={num_classes}")
  labels, boxes = batch["labels"], batch["boxes"]
  box_mask = batch["box_mask"].astype(bool)
  if num_boxes is None:
    num_boxes = box_mask.sum()
  num_boxes = jnp.maximum(jnp.asarray(num_boxes, jnp.float32), 1.0)

  sets = [("", outputs)]
  sets += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", None) or ())]
  terms = {}
  for suffix, preds in sets:
    for name, value in _single_set_losses(preds["pred_logits"], preds["pred_boxes"], labels,
                                          boxes, box_mask, num_boxes, loss_config).items():
      terms[name + suffix] = value
  if outputs.get("enc_outputs", None) is not None:
    enc = outputs["enc_outputs"]
    agnostic_labels = jnp.zeros_like(labels)
    for name, value in _single_set_losses(enc["pred_logits"], enc["pred_boxes"], agnostic_labels,
                                          boxes, box_mask, num_boxes, loss_config).items():
      terms[name + "_enc"] = value

  coefs = {"loss_ce": loss_config.cls_loss_coef, "loss_bbox": loss_config.bbox_loss_coef,
           "loss_giou": loss_config.giou_loss_coef}
  total = sum(coefs[name.split("_")[0] + "_" + name.split("_")[1]] * value
              for name, value in terms.items())
  return total, terms
