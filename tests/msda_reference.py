"""The official PyTorch formulation of multi-scale deformable attention (`grid_sample`).

Written from the definition in REFERENCE.md: bilinear, zeros padding, align_corners=False on
the grid 2 * loc - 1, weighted by the attention weights and summed over levels and points.
Used as the independent reference by the operator and kernel tests.
"""
import numpy as np
import torch
import torch.nn.functional as F


def ms_deform_attn_torch(value, spatial_shapes, sampling_locations, attention_weights):
  """value (B, S, M, D), sampling_locations (B, Q, M, L, P, 2), attention_weights (B, Q, M, L, P)
  -> (B, Q, M*D). All torch tensors."""
  b, _, m, d = value.shape
  _, q, _, num_levels, p, _ = sampling_locations.shape
  per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
  grids = 2 * sampling_locations - 1
  sampled = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    v = per_level[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)   # [B*M, D, H, W]
    g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)                   # [B*M, Q, P, 2]
    sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                 align_corners=False))                      # [B*M, D, Q, P]
  a = attention_weights.transpose(1, 2).reshape(b * m, 1, q, num_levels * p)
  out = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1)              # [B*M, D, Q]
  return out.view(b, m * d, q).transpose(1, 2)


def random_problem(rng: np.random.Generator, shapes, b=2, q=13, m=2, d=8, p=4,
                   spread=(-0.3, 1.3), dtype=np.float64):
  """Random value/locations/weights; locations drawn partly outside [0, 1]."""
  s = sum(h * w for h, w in shapes)
  value = rng.normal(size=(b, s, m, d)).astype(dtype)
  loc = rng.uniform(*spread, size=(b, q, m, len(shapes), p, 2)).astype(dtype)
  attn = rng.uniform(size=(b, q, m, len(shapes), p)).astype(dtype)
  return value, loc, attn


GRAD_NAMES = ("value", "sampling_locations", "attention_weights")


def assert_matches_torch_and_xla(got_out, got_grads, want_out, want_grads, xla_out, xla_grads):
  """float64 checks shared by the alternative impls: torch to 1e-10 (output) / 1e-9 relative
  (gradients), the XLA path to 1e-12."""
  np.testing.assert_allclose(got_out, want_out, rtol=0, atol=1e-10)
  np.testing.assert_allclose(got_out, xla_out, rtol=0, atol=1e-12)
  for name, g, w, x in zip(GRAD_NAMES, got_grads, want_grads, xla_grads):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(w).max()),
                               err_msg=name)
    np.testing.assert_allclose(g, x, rtol=1e-10, atol=1e-12, err_msg=name)
