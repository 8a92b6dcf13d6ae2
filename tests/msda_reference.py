"""The official PyTorch formulation of multi-scale deformable attention (`grid_sample`).

Written from the op's definition in the paper and the official code: bilinear, zeros padding,
align_corners=False on the grid 2 * loc - 1, weighted by the attention weights and summed over
levels and points.
Used as the independent reference by the operator and kernel tests.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddetr_jax.ops.ms_deform_attn import ms_deform_attn


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


def torch_out_and_grads(value, spatial_shapes, loc, attn, cot):
  """The torch reference's output and the gradients of sum(out * cot) w.r.t. value, loc and
  attn; numpy in, numpy out."""
  tensors = [torch.tensor(x, requires_grad=True) for x in (value, loc, attn)]
  out = ms_deform_attn_torch(tensors[0], spatial_shapes, tensors[1], tensors[2])
  (out * torch.from_numpy(cot)).sum().backward()
  return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def jax_out_and_grads(fn, value, loc, attn, cot):
  """The same for a JAX sampler fn(value, loc, attn) (cot cast to the output's dtype)."""
  out, vjp = jax.vjp(fn, *(jnp.asarray(x) for x in (value, loc, attn)))
  return np.asarray(out), [np.asarray(g) for g in vjp(jnp.asarray(cot, out.dtype))]


def impl_out_and_grads(impl, value, spatial_shapes, loc, attn, cot):
  """`jax_out_and_grads` of ms_deform_attn(..., impl=impl)."""
  return jax_out_and_grads(lambda v, l, a: ms_deform_attn(v, spatial_shapes, l, a, impl=impl),
                           value, loc, attn, cot)


def assert_matches_torch_and_xla(got_out, got_grads, want_out, want_grads, xla_out, xla_grads):
  """float64 checks shared by the alternative impls: torch to 1e-10 (output) / 1e-9 relative
  (gradients), the XLA path to 1e-12."""
  np.testing.assert_allclose(got_out, want_out, rtol=0, atol=1e-10)
  np.testing.assert_allclose(got_out, xla_out, rtol=0, atol=1e-12)
  for name, g, w, x in zip(GRAD_NAMES, got_grads, want_grads, xla_grads):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(w).max()),
                               err_msg=name)
    np.testing.assert_allclose(g, x, rtol=1e-10, atol=1e-12, err_msg=name)


def sharded_and_single_device_runs(impl):
  """One random float32 problem, batch 8 over 3 levels, run by jitted ms_deform_attn(impl=impl)
  forward and gradient (of the output's sum) on one device and batch-sharded over 8 devices.

  Returns (fwd, grad, sharded_args, (single_out, single_grads), (sharded_out, sharded_grads)).
  """
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  rng = np.random.default_rng(5)
  shapes = ((6, 7), (3, 4), (2, 2))
  value, loc, attn = random_problem(rng, shapes, b=8, q=9, dtype=np.float32)
  shard = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  fwd = jax.jit(lambda v, l, a: ms_deform_attn(v, shapes, l, a, impl=impl))
  grad = jax.jit(jax.grad(lambda v, l, a: ms_deform_attn(v, shapes, l, a, impl=impl).sum(),
                          argnums=(0, 1, 2)))
  single = fwd(value, loc, attn), grad(value, loc, attn)
  args = [jax.device_put(x, shard) for x in (value, loc, attn)]
  return fwd, grad, args, single, (fwd(*args), grad(*args))
