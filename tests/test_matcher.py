"""The matcher against scipy's linear_sum_assignment and HF transformers' matcher cost."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import torch
from transformers.image_transforms import center_to_corners_format
from transformers.loss import loss_for_object_detection as hf
from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

from ddetr_jax import matcher

SOLVERS = ("hungarian", "scipy")


@functools.lru_cache(maxsize=None)
def _jitted_solve(solver):
  return jax.jit(functools.partial(matcher.solve, solver=solver))


def _random_problem(rng, batch, num_targets, num_queries, counts):
  cost = rng.normal(size=(batch, num_targets, num_queries)).astype(np.float32)
  box_mask = np.arange(num_targets)[None, :] < np.asarray(counts)[:, None]
  # Real targets in scattered slots, not only a prefix.
  for b in range(batch):
    box_mask[b] = rng.permutation(box_mask[b])
  return cost, box_mask


def _check_optimal(cost, box_mask, query_index, matched):
  query_index, matched = np.asarray(query_index), np.asarray(matched)
  for b in range(cost.shape[0]):
    real = np.flatnonzero(box_mask[b])
    assert not np.any(matched[b] & ~box_mask[b]), "a padded slot was matched"
    assert matched[b].sum() == min(real.size, cost.shape[2])
    used = query_index[b][matched[b]]
    assert len(set(used.tolist())) == used.size, "a query is matched twice"
    ours = cost[b, np.flatnonzero(matched[b]), used].sum()
    if real.size:
      rows, cols = scipy.optimize.linear_sum_assignment(cost[b][real].astype(np.float64))
      best = cost[b][real][rows, cols].sum()
    else:
      best = 0.0
    np.testing.assert_allclose(ours, best, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_optimal_against_scipy(solver):
  rng = np.random.default_rng(0)
  solve = _jitted_solve(solver)
  # T < Q with 0..T real targets (zero targets included), all slots real (T = max_boxes),
  # and more target slots than queries (some images with more real targets than queries).
  for num_targets, num_queries, counts in [(8, 16, [0, 1, 5, 8]), (12, 12, [12, 12, 3, 0]),
                                           (10, 6, [10, 6, 4, 0])]:
    for _ in range(3):
      cost, box_mask = _random_problem(rng, 4, num_targets, num_queries, counts)
      query_index, matched = solve(cost, box_mask)
      assert query_index.dtype == jnp.int32 and matched.dtype == jnp.bool_
      assert query_index.shape == matched.shape == (4, num_targets)
      _check_optimal(cost, box_mask, query_index, matched)


def test_solvers_agree_and_batch_invariance():
  rng = np.random.default_rng(1)
  cost, box_mask = _random_problem(rng, 5, 8, 16, [0, 2, 8, 5, 7])
  results = {s: [np.asarray(x) for x in _jitted_solve(s)(cost, box_mask)] for s in SOLVERS}
  (qa, ma), (qb, mb) = results["hungarian"], results["scipy"]
  np.testing.assert_array_equal(ma, mb)
  np.testing.assert_array_equal(np.where(ma, qa, -1), np.where(mb, qb, -1))  # unique optimum
  # Every image alone gives the same matching as inside the batch.
  for b in range(5):
    q1, m1 = _jitted_solve("hungarian")(cost[b:b + 1], box_mask[b:b + 1])
    np.testing.assert_array_equal(np.asarray(m1)[0], ma[b])
    np.testing.assert_array_equal(np.where(np.asarray(m1)[0], np.asarray(q1)[0], -1),
                                  np.where(ma[b], qa[b], -1))
  # Padded slots' contents cannot change the matching of the real ones.
  noisy = np.where(box_mask[..., None], cost, rng.normal(size=cost.shape).astype(np.float32) * 100)
  q2, m2 = _jitted_solve("hungarian")(noisy, box_mask)
  np.testing.assert_array_equal(np.where(np.asarray(m2), np.asarray(q2), -1), np.where(ma, qa, -1))


def _hf_cost(logits, pred_boxes, labels, boxes, cost_class, cost_bbox, cost_giou):
  """The cost exactly as HF's DeformableDetrHungarianMatcher builds it, per image [Q, T]."""
  prob = torch.from_numpy(logits).sigmoid()
  alpha, gamma = 0.25, 2.0
  neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
  pos = alpha * (1 - prob)**gamma * -(prob + 1e-8).log()
  out_boxes, tgt_boxes = torch.from_numpy(pred_boxes), torch.from_numpy(boxes)
  cls = pos[:, labels] - neg[:, labels]
  l1 = torch.cdist(out_boxes, tgt_boxes, p=1)
  giou = -hf.generalized_box_iou(center_to_corners_format(out_boxes),
                                 center_to_corners_format(tgt_boxes))
  return (cost_bbox * l1 + cost_class * cls + cost_giou * giou).numpy()


def test_cost_matrix_matches_hf_and_matching_matches_hf_matcher():
  rng = np.random.default_rng(2)
  batch, num_queries, num_classes, num_targets = 3, 10, 6, 5
  logits = rng.normal(size=(batch, num_queries, num_classes)).astype(np.float32) * 2
  pred_boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, num_queries, 2)),
                               rng.uniform(0.05, 0.4, (batch, num_queries, 2))], -1).astype(np.float32)
  labels = rng.integers(0, num_classes, (batch, num_targets)).astype(np.int32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, num_targets, 2)),
                          rng.uniform(0.05, 0.4, (batch, num_targets, 2))], -1).astype(np.float32)
  box_mask = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  boxes[~box_mask] = 0.0  # padded slots hold zero boxes, as the data pipeline writes them.
  cost = matcher.cost_matrix(jnp.asarray(logits), jnp.asarray(pred_boxes), jnp.asarray(labels),
                             jnp.asarray(boxes), cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
  hf_match = DeformableDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
  targets = [{"class_labels": torch.from_numpy(labels[b][box_mask[b]]).long(),
              "boxes": torch.from_numpy(boxes[b][box_mask[b]])} for b in range(batch)]
  hf_indices = hf_match({"logits": torch.from_numpy(logits),
                         "pred_boxes": torch.from_numpy(pred_boxes)}, targets)
  for solver in SOLVERS:
    query_index, matched = matcher.match(
        jnp.asarray(logits), jnp.asarray(pred_boxes), jnp.asarray(labels), jnp.asarray(boxes),
        jnp.asarray(box_mask), cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, solver=solver)
    np.testing.assert_array_equal(np.asarray(matched), box_mask)
    for b in range(batch):
      real = np.flatnonzero(box_mask[b])
      ref = _hf_cost(logits[b], pred_boxes[b], labels[b][real], boxes[b][real], 2.0, 5.0, 2.0)
      np.testing.assert_allclose(np.asarray(cost)[b][real].T, ref, rtol=1e-5, atol=1e-5)
      pairs = sorted(zip(real.tolist(), np.asarray(query_index)[b][real].tolist()))
      hf_pairs = sorted((real[j].item(), i.item()) for i, j in zip(*hf_indices[b]))
      assert pairs == hf_pairs


def test_bad_shapes_and_solver_are_named():
  with pytest.raises(ValueError, match="box_mask"):
    matcher.solve(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), bool))
  with pytest.raises(ValueError, match="'nope'"):
    matcher.solve(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), bool), solver="nope")
  with pytest.raises(ValueError, match=r"boxes \(2, 3, 5\)"):
    matcher.match(jnp.zeros((2, 4, 5)), jnp.zeros((2, 4, 4)), jnp.zeros((2, 3), jnp.int32),
                  jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), bool))
