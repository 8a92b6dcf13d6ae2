"""impl='xla_packed' (four bilinear corners packed in one row) against PyTorch and impl='xla'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddetr_jax.ops import ms_deform_attn as msda_module
from ddetr_jax.ops.ms_deform_attn import ms_deform_attn
from tests import msda_reference
from tests.msda_reference import (impl_out_and_grads, ms_deform_attn_torch,
                                  random_problem, torch_out_and_grads)

CASES = [  # (seed, spatial_shapes, D, P)
    (0, ((7, 5),), 8, 2),
    (1, ((1, 1), (6, 9), (3, 2)), 32, 4),
    (2, ((5, 11), (3, 6), (2, 3), (1, 2)), 8, 3),
]


@pytest.mark.parametrize("seed,shapes,d,p", CASES)
@pytest.mark.parametrize("chunk", [None, 5])
def test_packed_matches_torch_and_xla_float64(seed, shapes, d, p, chunk, monkeypatch):
  if chunk:  # the chunked (map / scan) path, Q=13 not a multiple of the chunk
    monkeypatch.setattr(msda_module, "QUERY_CHUNK", chunk)
  rng = np.random.default_rng(seed)
  value, loc, attn = random_problem(rng, shapes, d=d, p=p)
  # Exact pixel-grid edges and far-away points on top of the random spread in [-0.3, 1.3].
  loc[0, 0, 0, :, 0] = [0.0, 0.0]
  loc[0, 1, 0, :, 0] = [1.0, 1.0]
  loc[1, 2, 1, :, 0] = [-5.0, 0.5]
  cot = rng.normal(size=(value.shape[0], loc.shape[1], value.shape[2] * d))
  want_out, want_grads = torch_out_and_grads(value, shapes, loc, attn, cot)
  with jax.enable_x64(True):
    got_out, got_grads = impl_out_and_grads("xla_packed", value, shapes, loc, attn, cot)
    xla_out, xla_grads = impl_out_and_grads("xla", value, shapes, loc, attn, cot)
  msda_reference.assert_matches_torch_and_xla(got_out, got_grads, want_out, want_grads,
                                              xla_out, xla_grads)


def test_packed_row_layout_by_hand():
  # value[y, x] = 10 * y + x on a 2x3 map, one head, D=1. Cell (x0, y0) = (-1, 1) holds the
  # corners (y, x) = (1, -1), (1, 0), (2, -1), (2, 0): only (1, 0) is inside, value 10.
  value = (10.0 * np.arange(2)[:, None] + np.arange(3)[None, :]).reshape(1, 6, 1)
  packed = np.asarray(msda_module._pack_level(jnp.asarray(value), 2, 3))
  assert packed.shape == (1, 3 * 4, 4)
  np.testing.assert_array_equal(packed[0, (1 + 1) * 4 + (-1 + 1)], [0, 10, 0, 0])
  np.testing.assert_array_equal(packed[0, (0 + 1) * 4 + (1 + 1)], [1, 2, 11, 12])
  np.testing.assert_array_equal(packed[0, (-1 + 1) * 4 + (2 + 1)], [0, 0, 2, 0])


def test_packed_float32_jit_and_bfloat16():
  rng = np.random.default_rng(9)
  shapes = ((8, 9), (4, 5))
  value, loc, attn = random_problem(rng, shapes, b=1, q=20, m=2, d=32, dtype=np.float32)
  want = ms_deform_attn_torch(torch.from_numpy(value), shapes, torch.from_numpy(loc),
                              torch.from_numpy(attn)).numpy()
  fn = jax.jit(ms_deform_attn, static_argnums=(1, 4))
  got = np.asarray(fn(value, shapes, loc, attn, "xla_packed"))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  out16 = fn(jnp.asarray(value, jnp.bfloat16), shapes, loc, attn, "xla_packed")
  assert out16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(out16, np.float32) - want).max() / np.abs(want).max() < 2e-2
