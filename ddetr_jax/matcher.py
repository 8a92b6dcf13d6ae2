"""Hungarian matching of predictions to padded, fixed-shape targets.

The cost is the official Deformable DETR one (the official `models/matcher.py`), per image:
  C[t, q] = cost_bbox * L1(box_q, box_t) + cost_class * focal(q, label_t)
            - cost_giou * GIoU(box_q, box_t)
with the focal-form class cost
  alpha * (1 - p)^gamma * -log(p + 1e-8) - (1 - alpha) * p^gamma * -log(1 - p + 1e-8),
p = sigmoid(logit of the target class), boxes in normalized cxcywh (GIoU on xyxy).

Representation of a matching (fixed shapes, usable inside `jit`):
  query_index [B, T] int32: the query matched to target slot t of image b;
  matched     [B, T] bool:  whether that slot really is matched. It is `box_mask`, except
                            when an image has more real targets than queries (then only
                            `num_queries` of them are matched, as scipy does).
Entries of `query_index` where `matched` is False are meaningless and must be masked out.
Every query is matched to at most one real target.

Padded target slots never influence the matching of real targets: for T <= Q their
cost rows are a constant (any assignment of them costs the same), for T > Q they cost
more than any real pair so real targets are always preferred.

Solvers: 'hungarian' (in-graph, `optax.assignment.hungarian_algorithm`, vmapped over the
batch; no host round-trip) and 'scipy' (`scipy.optimize.linear_sum_assignment` on the
host through `jax.pure_callback`; a single-process debugging reference: under a sharded jit
XLA gathers the cost matrices to device 0 for the callback, and it is not meant for
multi-process runs).
"""
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from ddetr_jax import box_ops
from ddetr_jax import errors

SOLVERS = ("hungarian", "scipy")
# Replacement for NaN/inf costs: finite so the in-graph solver always terminates,
# large so such a pair is used only when nothing else is left (as HF does).
_INVALID_COST = 1e8


def focal_class_cost(pred_logits: jnp.ndarray, labels: jnp.ndarray,
                     alpha: float = 0.25, gamma: float = 2.0) -> jnp.ndarray:
  """Focal-form classification cost.

  Args:
    pred_logits: [B, Q, C] logits.
    labels: [B, T] int class ids in [0, C).

  Returns:
    [B, T, Q] cost of assigning target t to query q.
  """
  prob = jax.nn.sigmoid(pred_logits.astype(jnp.float32))                   # [B, Q, C]
  neg_cost = (1 - alpha) * prob**gamma * -jnp.log(1 - prob + 1e-8)
  pos_cost = alpha * (1 - prob)**gamma * -jnp.log(prob + 1e-8)
  class_cost = pos_cost - neg_cost                                         # [B, Q, C]
  # Gather the target class for every (target, query) pair.
  labels = jnp.clip(labels.astype(jnp.int32), 0, pred_logits.shape[-1] - 1)  # padded slots
  index = jnp.broadcast_to(labels[:, None, :], class_cost.shape[:2] + labels.shape[1:])
  per_query = jnp.take_along_axis(class_cost, index, axis=2)  # [B, Q, T]
  return jnp.swapaxes(per_query, 1, 2)                                     # [B, T, Q]


def cost_matrix(pred_logits: jnp.ndarray, pred_boxes: jnp.ndarray,
                labels: jnp.ndarray, boxes: jnp.ndarray, *,
                cost_class: float, cost_bbox: float, cost_giou: float,
                focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> jnp.ndarray:
  """The official matching cost (padded slots included, not yet masked).

  Args:
    pred_logits: [B, Q, C] logits.
    pred_boxes: [B, Q, 4] normalized cxcywh.
    labels: [B, T] int class ids.
    boxes: [B, T, 4] normalized cxcywh.

  Returns:
    [B, T, Q] float32 cost, NaN/inf replaced by a large finite value.
  """
  pred_boxes = pred_boxes.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  l1 = jnp.abs(boxes[:, :, None, :] - pred_boxes[:, None, :, :]).sum(-1)  # [B, T, Q]
  giou = box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(boxes),
                                     box_ops.box_cxcywh_to_xyxy(pred_boxes))  # [B, T, Q]
  cls = focal_class_cost(pred_logits, labels, focal_alpha, focal_gamma)    # [B, T, Q]
  cost = cost_bbox * l1 + cost_class * cls - cost_giou * giou
  return jnp.nan_to_num(cost, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=_INVALID_COST)


def _mask_padded(cost: jnp.ndarray, box_mask: jnp.ndarray) -> jnp.ndarray:
  """Gives padded target rows a cost that cannot change the real targets' matching."""
  num_targets, num_queries = cost.shape[1:]
  if num_targets <= num_queries:
    padded_cost = jnp.zeros_like(cost)  # every target row is matched; the constant is irrelevant.
  else:
    real_max = jnp.max(jnp.where(box_mask[:, :, None], cost, -jnp.inf), axis=(1, 2))  # [B]
    real_max = jnp.where(jnp.isfinite(real_max), real_max, 0.0)
    padded_cost = jnp.broadcast_to((real_max + 1.0)[:, None, None], cost.shape)
  return jnp.where(box_mask[:, :, None], cost, padded_cost)


def _hungarian_single(cost: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Optimal assignment of one [T, Q] cost matrix -> (query_index [T], assigned [T])."""
  num_targets = cost.shape[0]
  rows, cols = optax.assignment.hungarian_algorithm(cost)  # each of length min(T, Q)
  query_index = jnp.zeros((num_targets,), jnp.int32).at[rows].set(cols.astype(jnp.int32))
  assigned = jnp.zeros((num_targets,), bool).at[rows].set(True)
  return query_index, assigned


def _scipy_host(cost: np.ndarray, box_mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Host solver on the real targets only: cost [B, T, Q], box_mask [B, T]."""
  batch, num_targets, _ = cost.shape
  query_index = np.zeros((batch, num_targets), np.int32)
  matched = np.zeros((batch, num_targets), bool)
  for b in range(batch):
    real = np.flatnonzero(box_mask[b])
    if real.size == 0:
      continue
    rows, cols = scipy.optimize.linear_sum_assignment(np.asarray(cost[b][real], np.float64))
    query_index[b, real[rows]] = cols
    matched[b, real[rows]] = True
  return query_index, matched


def solve(cost: jnp.ndarray, box_mask: jnp.ndarray, solver: str = "hungarian"
          ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Minimum-cost matching of real targets to queries.

  Args:
    cost: [B, T, Q] cost of matching target slot t to query q.
    box_mask: [B, T] bool, True = real target.
    solver: 'hungarian' (in-graph) or 'scipy' (host callback).

  Returns:
    (query_index [B, T] int32, matched [B, T] bool); see the module docstring.
  """
  if cost.ndim != 3 or box_mask.shape != cost.shape[:2]:
    raise ValueError(f"matcher: cost must be [B, T, Q] and box_mask [B, T]; got cost "
                     f"{cost.shape} and box_mask {box_mask.shape}")
  box_mask = box_mask.astype(bool)
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  if solver == "hungarian":
    query_index, assigned = jax.vmap(_hungarian_single)(_mask_padded(cost, box_mask))
    return query_index, assigned & box_mask
  if solver == "scipy":
    out_shapes = (jax.ShapeDtypeStruct(box_mask.shape, jnp.int32),
                  jax.ShapeDtypeStruct(box_mask.shape, jnp.bool_))
    return jax.pure_callback(_scipy_host, out_shapes, cost, box_mask,
                             vmap_method="sequential")
  raise errors.InvalidInputError(f"matcher: unknown solver {solver!r} (config.loss.matcher); "
                   f"expected one of {SOLVERS}")


def match(pred_logits: jnp.ndarray, pred_boxes: jnp.ndarray, labels: jnp.ndarray,
          boxes: jnp.ndarray, box_mask: jnp.ndarray, *,
          cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
          focal_alpha: float = 0.25, focal_gamma: float = 2.0,
          solver: str = "hungarian") -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Matches predictions to padded targets (no gradient flows through the matching).

  Args:
    pred_logits: [B, Q, C] logits.
    pred_boxes: [B, Q, 4] normalized cxcywh.
    labels: [B, T] int class ids.
    boxes: [B, T, 4] normalized cxcywh.
    box_mask: [B, T] bool, True = real target.
    cost_class, cost_bbox, cost_giou: cost weights (config.loss.set_cost_*).
    focal_alpha, focal_gamma: focal class-cost parameters.
    solver: 'hungarian' or 'scipy' (config.loss.matcher).

  Returns:
    (query_index [B, T] int32, matched [B, T] bool).
  """
  batch, num_queries = pred_logits.shape[:2]
  if (pred_logits.ndim != 3 or pred_boxes.shape != (batch, num_queries, 4)
      or labels.ndim != 2 or labels.shape[0] != batch
      or boxes.shape != labels.shape + (4,) or box_mask.shape != labels.shape):
    raise ValueError(
        "matcher: expected pred_logits [B, Q, C], pred_boxes [B, Q, 4], labels [B, T], "
        f"boxes [B, T, 4], box_mask [B, T]; got pred_logits {pred_logits.shape}, pred_boxes "
        f"{pred_boxes.shape}, labels {labels.shape}, boxes {boxes.shape}, box_mask {box_mask.shape}")
  pred_logits, pred_boxes = jax.lax.stop_gradient((pred_logits, pred_boxes))
  cost = cost_matrix(pred_logits, pred_boxes, labels, boxes, cost_class=cost_class,
                     cost_bbox=cost_bbox, cost_giou=cost_giou,
                     focal_alpha=focal_alpha, focal_gamma=focal_gamma)
  return solve(cost, box_mask, solver)
