"""ms_deform_attn (XLA gather implementation) against PyTorch's grid_sample formulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import test_util as jtu

from ddetr_jax.ops import ms_deform_attn as msda_module
from ddetr_jax.ops.ms_deform_attn import ms_deform_attn
from tests.msda_reference import (ms_deform_attn_torch, random_problem,
                                  sharded_and_single_device_runs)


def _random_shapes(rng, num_levels):
  shapes = [(int(rng.integers(1, 38)), int(rng.integers(1, 54))) for _ in range(num_levels)]
  shapes[0] = (1, 1) if num_levels > 1 and rng.uniform() < 0.5 else shapes[0]
  return tuple(shapes)


CASES = [  # (seed, levels, D, P)
    (0, 1, 8, 1), (1, 2, 32, 4), (2, 3, 8, 4), (3, 4, 32, 1), (4, 4, 8, 4),
]


def _torch_out(value, shapes, loc, attn):
  return ms_deform_attn_torch(*[torch.from_numpy(x) for x in (value,)], shapes,
                              torch.from_numpy(loc), torch.from_numpy(attn)).numpy()


@pytest.mark.parametrize("seed,levels,d,p", CASES)
def test_forward_float64(seed, levels, d, p):
  rng = np.random.default_rng(seed)
  shapes = _random_shapes(rng, levels) if seed else ((37, 53),)
  value, loc, attn = random_problem(rng, shapes, d=d, p=p)
  want = _torch_out(value, shapes, loc, attn)
  with jax.enable_x64(True):
    got = np.asarray(ms_deform_attn(jnp.asarray(value), shapes, jnp.asarray(loc), jnp.asarray(attn)))
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed,levels,d,p", CASES)
def test_forward_float32(seed, levels, d, p):
  rng = np.random.default_rng(100 + seed)
  shapes = _random_shapes(rng, levels)
  value, loc, attn = random_problem(rng, shapes, d=d, p=p, dtype=np.float32)
  want = _torch_out(value, shapes, loc, attn)
  got = np.asarray(jax.jit(ms_deform_attn, static_argnums=1)(value, shapes, loc, attn))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _grads_torch(value, shapes, loc, attn, cotangent):
  tensors = [torch.tensor(x, requires_grad=True) for x in (value, loc, attn)]
  out = ms_deform_attn_torch(tensors[0], shapes, tensors[1], tensors[2])
  (out * torch.from_numpy(cotangent)).sum().backward()
  return [t.grad.numpy() for t in tensors]


def _grads_jax(value, shapes, loc, attn, cotangent):
  def f(v, l, a):
    return (ms_deform_attn(v, shapes, l, a) * cotangent).sum()
  return [np.asarray(g) for g in jax.grad(f, argnums=(0, 1, 2))(
      jnp.asarray(value), jnp.asarray(loc), jnp.asarray(attn))]


@pytest.mark.parametrize("seed,levels,d,p", CASES[1:4])
@pytest.mark.parametrize("chunk", [None, 4])
def test_gradients_match_torch_float64(seed, levels, d, p, chunk, monkeypatch):
  if chunk:  # exercise the chunked (scan) path with Q not a multiple of the chunk
    monkeypatch.setattr(msda_module, "QUERY_CHUNK", chunk)
  rng = np.random.default_rng(200 + seed)
  shapes = _random_shapes(rng, levels)
  value, loc, attn = random_problem(rng, shapes, d=d, p=p)
  cot = rng.normal(size=(value.shape[0], loc.shape[1], value.shape[2] * d))
  want = _grads_torch(value, shapes, loc, attn, cot)
  with jax.enable_x64(True):
    got = _grads_jax(value, shapes, loc, attn, cot)
    if chunk:
      np.testing.assert_allclose(
          np.asarray(ms_deform_attn(jnp.asarray(value), shapes, jnp.asarray(loc),
                                    jnp.asarray(attn))),
          _torch_out(value, shapes, loc, attn), atol=1e-10)
  for name, g, w in zip(("value", "sampling_locations", "attention_weights"), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(w).max()),
                               err_msg=name)


def test_check_grads():
  rng = np.random.default_rng(7)
  shapes = ((3, 5), (2, 2))
  # Keep locations away from pixel-centre lines where bilinear sampling has kinks.
  value, loc, attn = random_problem(rng, shapes, b=1, q=3, m=2, d=4, p=2, spread=(0.05, 0.95))
  with jax.enable_x64(True):
    jtu.check_grads(lambda v, l, a: ms_deform_attn(v, shapes, l, a),
                              (jnp.asarray(value), jnp.asarray(loc), jnp.asarray(attn)),
                              order=1, modes=("rev",), eps=1e-6)


def test_borders_and_far_locations_are_finite():
  shapes = ((4, 6), (2, 3))
  rng = np.random.default_rng(3)
  value, _, attn = random_problem(rng, shapes, b=1, q=6, m=1, d=4, p=1, dtype=np.float32)
  special = np.array([0.0, 1.0, -1e30, 1e30, 0.5, -3.0], np.float32)
  loc = np.stack(np.broadcast_arrays(special[:, None], special[::-1, None]), -1)
  loc = np.broadcast_to(loc.reshape(1, 6, 1, 1, 1, 2), (1, 6, 1, 2, 1, 2)).copy()
  want = _torch_out(value, shapes, loc, attn)
  out, grads = jax.value_and_grad(lambda v, l, a: ms_deform_attn(v, shapes, l, a).sum(),
                                  argnums=(0, 1, 2))(value, loc, attn)
  got = np.asarray(jax.jit(ms_deform_attn, static_argnums=1)(value, shapes, loc, attn))
  assert np.isfinite(got).all() and all(np.isfinite(np.asarray(g)).all() for g in grads)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(got[0, 2:4] == 0.0)  # +-1e30 on both axes: nothing in bounds


def test_vmap_matches_batched_call():
  rng = np.random.default_rng(4)
  shapes = ((5, 4), (3, 2))
  value, loc, attn = random_problem(rng, shapes, b=3, dtype=np.float32)
  batched = ms_deform_attn(value, shapes, loc, attn)
  mapped = jax.vmap(lambda v, l, a: ms_deform_attn(v[None], shapes, l[None], a[None])[0])(
      value, loc, attn)
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(batched), rtol=1e-6, atol=1e-6)


def test_sharded_batch_equals_single_device():
  _, _, _, single, sharded = sharded_and_single_device_runs("xla")
  assert sharded[0].sharding.spec[0] == "data"
  np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(single[0]), rtol=1e-6, atol=1e-6)
  for g_s, g_1 in zip(sharded[1], single[1]):
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(g_1), rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
  rng = np.random.default_rng(6)
  shapes = ((8, 9), (4, 5))
  value, loc, attn = random_problem(rng, shapes, b=1, q=20, m=2, d=32, dtype=np.float32)
  ref = np.asarray(ms_deform_attn(value, shapes, loc, attn))
  out = ms_deform_attn(jnp.asarray(value, jnp.bfloat16), shapes, loc,
                       jnp.asarray(attn, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
  assert err < 2e-2, err
  g = jax.grad(lambda v: ms_deform_attn(v, shapes, loc, attn).astype(jnp.float32).sum())(
      jnp.asarray(value, jnp.bfloat16))
  assert g.dtype == jnp.bfloat16


@pytest.mark.parametrize("args,match", [
    (dict(value=np.zeros((2, 10, 1))), "value must have rank 4"),
    (dict(value=np.zeros((2, 11, 2, 4))), "S=11"),
    (dict(loc=np.zeros((2, 3, 2, 1, 4, 2))), "levels"),
    (dict(loc=np.zeros((2, 3, 2, 2, 4, 3))), "sampling_locations must have shape"),
    (dict(attn=np.zeros((2, 3, 2, 2, 5))), "attention_weights shape"),
    (dict(shapes=((2, 3), (0, 2))), "positive sizes"),
])
def test_bad_input_raises_value_error(args, match):
  shapes = args.get("shapes", ((2, 3), (2, 2)))
  value = args.get("value", np.zeros((2, 10, 2, 4), np.float32))
  loc = args.get("loc", np.zeros((2, 3, 2, 2, 4, 2), np.float32))
  attn = args.get("attn", np.zeros((2, 3, 2, 2, 4), np.float32))
  with pytest.raises(ValueError, match=match):
    ms_deform_attn(value, shapes, loc, attn)


def test_unknown_impl_raises():
  with pytest.raises(ValueError, match="impl"):
    ms_deform_attn(np.zeros((1, 1, 1, 1)), ((1, 1),), np.zeros((1, 1, 1, 1, 1, 2)),
                   np.zeros((1, 1, 1, 1, 1)), impl="cuda")
