"""impl='cpu' (the C++ XLA FFI kernel) against PyTorch's grid_sample formulation and impl='xla':
outputs and all three gradients, duplicates in the value-gradient scatter, vmap, batch
sharding over 8 devices (each device runs on its own shard), remat inside scan, dtypes, and the
build cache."""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu
from jax.sharding import NamedSharding, PartitionSpec as P

from ddetr_jax.ops import ms_deform_attn_cpu as cpu_module
from ddetr_jax.ops.ms_deform_attn import ms_deform_attn
from tests import msda_reference
from tests.msda_reference import (impl_out_and_grads, random_problem,
                                  sharded_and_single_device_runs, torch_out_and_grads)

CASES = [  # (seed, spatial_shapes, D, P, Q, M)
    (0, ((37, 53),), 8, 1, 11, 2),
    (1, ((1, 1), (6, 9), (3, 2)), 32, 4, 13, 3),
    (2, ((5, 11), (3, 6), (2, 3), (1, 2)), 8, 4, 9, 2),
    (3, ((17, 4), (1, 30), (9, 9), (2, 1)), 32, 1, 7, 1),
    (4, ((7, 6), (3, 4)), 64, 2, 5, 2),  # D 32 and 64 run the kernel's compiled-D units
    # Large maps: the kernel prefetches sampled rows (a unit's rows over 512 KB), on the rows in
    # place (few queries per row) and on its contiguous copy of them (>= 2 corners per row).
    (5, ((70, 60), (3, 3)), 32, 2, 6, 2),
    (6, ((70, 60),), 32, 4, 600, 2),
]
# Cases 1 and 2 sample their rows often enough for the contiguous copy (M > 1 and queries x L x
# P x 4 corners >= 2 x S); 0 and 4 work on the rows in place, 3 too (one head: contiguous).


@pytest.mark.parametrize("seed,shapes,d,p,q,m", CASES)
def test_forward_and_gradients_match_torch_and_xla_float64(seed, shapes, d, p, q, m):
  rng = np.random.default_rng(seed)
  value, loc, attn = random_problem(rng, shapes, b=2, q=q, m=m, d=d, p=p)
  cot = rng.normal(size=(2, q, m * d))
  want_out, want_grads = torch_out_and_grads(value, shapes, loc, attn, cot)
  with jax.enable_x64(True):
    got_out, got_grads = impl_out_and_grads("cpu", value, shapes, loc, attn, cot)
    xla_out, xla_grads = impl_out_and_grads("xla", value, shapes, loc, attn, cot)
  assert got_out.dtype == np.float64
  msda_reference.assert_matches_torch_and_xla(got_out, got_grads, want_out, want_grads,
                                              xla_out, xla_grads)


@pytest.mark.parametrize("seed,shapes,d,p,q,m", CASES)
def test_float32_jit_matches_torch(seed, shapes, d, p, q, m):
  rng = np.random.default_rng(100 + seed)
  value, loc, attn = random_problem(rng, shapes, b=2, q=q, m=m, d=d, p=p, dtype=np.float32)
  cot = rng.normal(size=(2, q, m * d)).astype(np.float32)
  want_out, want_grads = torch_out_and_grads(value, shapes, loc, attn, cot)
  fwd = jax.jit(lambda v, l, a: ms_deform_attn(v, shapes, l, a, impl="cpu"))
  got = np.asarray(fwd(value, loc, attn))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want_out, rtol=1e-5, atol=1e-5 * np.abs(want_out).max())
  grads = jax.jit(jax.grad(lambda v, l, a: jnp.vdot(fwd(v, l, a), cot), argnums=(0, 1, 2)))(
      value, loc, attn)
  for name, g, w in zip(msda_reference.GRAD_NAMES, grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5 * np.abs(w).max(),
                               err_msg=name)


def test_check_grads():
  rng = np.random.default_rng(7)
  shapes = ((3, 5), (2, 2))
  # Away from pixel-centre lines, where bilinear sampling has kinks.
  value, loc, attn = random_problem(rng, shapes, b=1, q=3, m=2, d=4, p=2, spread=(0.05, 0.95))
  with jax.enable_x64(True):
    jtu.check_grads(lambda v, l, a: ms_deform_attn(v, shapes, l, a, impl="cpu"),
                    (jnp.asarray(value), jnp.asarray(loc), jnp.asarray(attn)),
                    order=1, modes=("rev",), eps=1e-6)


def test_value_gradient_sums_every_duplicate():
  # 20 queries x 3 points of one head all sample the centre of pixel (y, x) = (2, 1) of a 4x3
  # map (weight 1 there, 0 elsewhere): the value gradient at that pixel must be the sum of all
  # 60 contributions attn * g, and the other head's rows must stay zero.
  shapes = ((4, 3),)
  q, p, d = 20, 3, 32
  rng = np.random.default_rng(11)
  value = rng.normal(size=(1, 12, 2, d)).astype(np.float32)
  loc = np.full((1, q, 2, 1, p, 2), -5.0, np.float32)  # head 1: far outside the map
  loc[:, :, 0] = [(1 + 0.5) / 3, (2 + 0.5) / 4]
  attn = rng.uniform(0.5, 1.5, size=(1, q, 2, 1, p)).astype(np.float32)
  cot = rng.normal(size=(1, q, 2 * d)).astype(np.float32)
  _, (grad_v, _, grad_a) = impl_out_and_grads("cpu", value, shapes, loc, attn, cot)
  want = np.einsum("qp,qd->d", attn[0, :, 0, 0].astype(np.float64),
                   cot[0, :, :d].astype(np.float64))
  np.testing.assert_allclose(grad_v[0, 2 * 3 + 1, 0], want, rtol=1e-5, atol=1e-5)
  assert np.all(np.delete(grad_v[0, :, 0], 2 * 3 + 1, axis=0) == 0.0)
  assert np.all(grad_v[0, :, 1] == 0.0) and np.all(grad_a[0, :, 1] == 0.0)
  np.testing.assert_allclose(grad_a[0, :, 0, 0],
                             np.broadcast_to((cot[0, :, :d] @ value[0, 7, 0])[:, None], (q, p)),
                             rtol=1e-5, atol=1e-5)


def test_borders_and_far_locations_are_finite_and_match_torch():
  shapes = ((4, 6), (2, 3))
  rng = np.random.default_rng(3)
  value, _, attn = random_problem(rng, shapes, b=1, q=6, m=1, d=4, p=1, dtype=np.float32)
  special = np.array([0.0, 1.0, -1e30, 1e30, 0.5, -3.0], np.float32)
  loc = np.stack(np.broadcast_arrays(special[:, None], special[::-1, None]), -1)
  loc = np.broadcast_to(loc.reshape(1, 6, 1, 1, 1, 2), (1, 6, 1, 2, 1, 2)).copy()
  cot = np.ones((1, 6, 4), np.float32)
  want_out, want_grads = torch_out_and_grads(value, shapes, loc, attn, cot)
  got_out, got_grads = impl_out_and_grads("cpu", value, shapes, loc, attn, cot)
  assert np.isfinite(got_out).all() and all(np.isfinite(g).all() for g in got_grads)
  np.testing.assert_allclose(got_out, want_out, atol=1e-5)
  for name, g, w in zip(msda_reference.GRAD_NAMES, got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-4, err_msg=name)
  assert np.all(got_out[0, 2:4] == 0.0)  # +-1e30 on both axes: nothing in bounds


def test_vmap_folds_into_the_batch():
  rng = np.random.default_rng(4)
  shapes = ((5, 4), (3, 2))
  value, loc, attn = random_problem(rng, shapes, b=6, dtype=np.float32)
  batched = np.asarray(ms_deform_attn(value, shapes, loc, attn, impl="cpu"))
  one = lambda v, l, a: ms_deform_attn(v[None], shapes, l[None], a[None], impl="cpu")[0]
  mapped = jax.vmap(one)(value, loc, attn)
  np.testing.assert_allclose(np.asarray(mapped), batched, rtol=1e-6, atol=1e-6)
  # Nested, with the value map shared (not mapped) along the inner axis.
  nested = jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)), in_axes=(0, 0, 0))(
      value[:2], loc.reshape(2, 3, *loc.shape[1:]), attn.reshape(2, 3, *attn.shape[1:]))
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(
          np.asarray(nested[i, j]),
          np.asarray(one(value[i], loc[3 * i + j], attn[3 * i + j])), rtol=1e-6, atol=1e-6)
  # Gradients through vmap equal the batched call's.
  g_map = jax.grad(lambda v: jax.vmap(one)(v, loc, attn).sum())(value)
  g_bat = jax.grad(lambda v: ms_deform_attn(v, shapes, loc, attn, impl="cpu").sum())(value)
  np.testing.assert_allclose(np.asarray(g_map), np.asarray(g_bat), rtol=1e-6, atol=1e-6)


def _all_shapes(jaxpr) -> list[tuple]:
  """Shapes of every value an (inner) equation of a jaxpr produces, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  shapes = []
  for eqn in jaxpr.eqns:
    shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          shapes += _all_shapes(sub)
  return shapes


def test_vmap_with_a_shared_value_folds_into_the_queries():
  """vmap over query sets with the value map not mapped: one call whose queries are the n
  sets, equal to n separate calls, with no n-fold copy of value in the forward."""
  rng = np.random.default_rng(5)
  shapes = ((6, 5), (3, 2))
  value, loc, attn = random_problem(rng, shapes, b=4, q=7, m=2, d=8, dtype=np.float32)
  one = lambda v, l, a: ms_deform_attn(v[None], shapes, l[None], a[None], impl="cpu")[0]
  for in_axes, a_arg in (((None, 0, 0), attn), ((None, 0, None), attn[0])):
    shared = jax.vmap(one, in_axes=in_axes)
    out = np.asarray(shared(value[0], loc, a_arg))
    for i in range(4):
      want = one(value[0], loc[i], a_arg if in_axes[2] is None else a_arg[i])
      np.testing.assert_allclose(out[i], np.asarray(want), rtol=1e-6, atol=1e-6)
    produced = _all_shapes(jax.make_jaxpr(shared)(value[0], loc, a_arg))
    assert (1, 4 * 7, 2, 8) in produced  # the single call's output: 4 sets of 7 queries
    copies = [sh for sh in produced
              if sh[-3:] == value[0].shape and np.prod(sh) == 4 * value[0].size]
    assert not copies, copies
  # The gradient (whose backward does broadcast value) is the sum of the separate ones.
  g_shared = jax.grad(lambda v: jax.vmap(one, in_axes=(None, 0, 0))(v, loc, attn).sum())(value[0])
  g_sum = sum(jax.grad(lambda v, i=i: one(v, loc[i], attn[i]).sum())(value[0]) for i in range(4))
  np.testing.assert_allclose(np.asarray(g_shared), np.asarray(g_sum), rtol=1e-5, atol=1e-5)


def _assert_kernel_runs_per_batch_element(fwd, grad, args):
  """Each device's kernel calls, forward and gradient, see its own batch element only (batch 8
  over 8 devices): no all-gather of the other devices' inputs."""
  for fn in (fwd, grad):
    hlo = fn.lower(*args).compile().as_text()
    calls = [line for line in hlo.splitlines() if "custom_call_target=\"ddetr_msda_cpu" in line]
    assert calls and "all-gather" not in hlo
    assert all(f"f32[1,{args[0].shape[1]},2,8]" in line for line in calls), calls


def test_sharded_batch_runs_per_shard_and_equals_single_device():
  fwd, grad, args, single, sharded = sharded_and_single_device_runs("cpu")
  assert sharded[0].sharding.spec[0] == "data"
  assert all(g.sharding.spec[0] == "data" for g in sharded[1])
  np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(single[0]), rtol=1e-6, atol=1e-6)
  for g_s, g_1 in zip(sharded[1], single[1]):
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(g_1), rtol=1e-6, atol=1e-6)
  _assert_kernel_runs_per_batch_element(fwd, grad, args)


@pytest.mark.parametrize("sharded_arg", ["value", "queries"])
def test_one_batch_sharded_operand_splits_all_locally(sharded_arg):
  """Only value, or only the locations and weights, batch-sharded (the other replicated): the
  kernel still runs per batch shard, slicing the replicated operands, with no all-gather."""
  fwd, grad, args, single, _ = sharded_and_single_device_runs("cpu")
  replicated = NamedSharding(args[0].sharding.mesh, P())
  value, loc, attn = args
  if sharded_arg == "value":
    loc, attn = jax.device_put(loc, replicated), jax.device_put(attn, replicated)
  else:
    value = jax.device_put(value, replicated)
  mixed = (value, loc, attn)
  np.testing.assert_allclose(np.asarray(fwd(*mixed)), np.asarray(single[0]), rtol=1e-6, atol=1e-6)
  for g_m, g_1 in zip(grad(*mixed), single[1]):
    np.testing.assert_allclose(np.asarray(g_m), np.asarray(g_1), rtol=1e-6, atol=1e-6)
  _assert_kernel_runs_per_batch_element(fwd, grad, mixed)


def test_remat_inside_scan_matches_xla():
  rng = np.random.default_rng(8)
  shapes = ((6, 5), (3, 3))
  value, loc, attn = random_problem(rng, shapes, b=2, q=7, dtype=np.float32)
  locs = np.stack([loc, np.clip(loc + 0.05, -0.3, 1.3)])  # two "layers"

  def loss(impl, v, ls):
    layer = jax.checkpoint(lambda c, l: (ms_deform_attn(c, shapes, l, attn, impl=impl)
                                         .reshape(c.shape[0], -1, c.shape[2], c.shape[3])
                                         .mean(1, keepdims=True) + c, None))
    out, _ = jax.lax.scan(layer, v, ls)
    return (out ** 2).sum()
  got = jax.jit(jax.value_and_grad(lambda v, l: loss("cpu", v, l), argnums=(0, 1)))(value, locs)
  want = jax.value_and_grad(lambda v, l: loss("xla", v, l), argnums=(0, 1))(value, locs)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
  rng = np.random.default_rng(6)
  shapes = ((8, 9), (4, 5))
  value, loc, attn = random_problem(rng, shapes, b=1, q=20, m=2, d=32, dtype=np.float32)
  v16, a16 = jnp.asarray(value, jnp.bfloat16), jnp.asarray(attn, jnp.bfloat16)
  out = ms_deform_attn(v16, shapes, loc, a16, impl="cpu")
  assert out.dtype == jnp.bfloat16
  # The kernel's float32 result on the rounded inputs, rounded once at the end.
  ref = ms_deform_attn(v16.astype(jnp.float32), shapes, loc, a16.astype(jnp.float32), impl="xla")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.astype(jnp.bfloat16)))
  grads = jax.grad(lambda v, l, a: ms_deform_attn(v, shapes, l, a, impl="cpu")
                   .astype(jnp.float32).sum(), argnums=(0, 1, 2))(v16, loc, a16)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.bfloat16]


def test_cpu_impl_refuses_other_backends(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="impl='cpu' runs on the CPU backend only.*'tpu'"):
    ms_deform_attn(np.zeros((1, 1, 1, 1), np.float32), ((1, 1),),
                   np.zeros((1, 1, 1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 1, 1), np.float32),
                   impl="cpu")


def test_build_is_cached_per_source_and_compiler_errors_are_named(tmp_path, monkeypatch):
  monkeypatch.setenv("DDETR_JAX_KERNEL_CACHE", str(tmp_path / "kernels"))
  monkeypatch.delenv("CXX", raising=False)
  path = cpu_module.build()
  assert path.parent == tmp_path / "kernels" and path.suffix == ".so"
  mtime = path.stat().st_mtime_ns
  time.sleep(0.01)
  assert cpu_module.build() == path and path.stat().st_mtime_ns == mtime  # not rebuilt
  assert os.listdir(tmp_path / "kernels") == [path.name]  # no temp files left
  # A changed source is a new build key.
  source = tmp_path / "ms_deform_attn_cpu.cc"
  source.write_text(cpu_module._SOURCE.read_text() + "\n// changed\n")
  monkeypatch.setattr(cpu_module, "_SOURCE", source)
  assert cpu_module._library_path("c++") != path
  # No compiler, and a compiler that fails: errors that name it.
  monkeypatch.setenv("CXX", "no-such-compiler-xyz")
  with pytest.raises(RuntimeError, match="no-such-compiler-xyz"):
    cpu_module.build()
  monkeypatch.setenv("CXX", "false")
  with pytest.raises(RuntimeError, match="building ms_deform_attn_cpu.cc failed.*false"):
    cpu_module.build()
  assert sorted(os.listdir(tmp_path / "kernels")) == [path.name]  # the failed build left nothing


@pytest.mark.parametrize("d", [8, 32])  # the generic and a compiled-D unit
# A small first map: the kernel's units work on a contiguous copy of their rows; a larger one:
# on the rows in place.
@pytest.mark.parametrize("shapes", [((4, 5), (2, 3)), ((14, 15), (2, 3))])
def test_nan_location_gives_nan_where_xla_does(d, shapes):
  rng = np.random.default_rng(9)
  value, loc, attn = random_problem(rng, shapes, b=1, q=4, m=2, d=d, p=2, dtype=np.float32)
  loc[0, 1, 0, 1, 0, 0] = np.nan  # query 1, head 0, level 1, point 0: x is NaN
  cot = np.ones((1, 4, 2 * d), np.float32)
  got_out, got_grads = impl_out_and_grads("cpu", value, shapes, loc, attn, cot)
  xla_out, xla_grads = impl_out_and_grads("xla", value, shapes, loc, attn, cot)
  for got, want in ((got_out, xla_out), (got_grads[2], xla_grads[2])):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-5, atol=1e-5)
  # The location gradient of the NaN point is NaN (xla: NaN in y only, by accident of its
  # masks); every other location gradient matches.
  assert np.isnan(got_grads[1][0, 1, 0, 1, 0]).all()
  others = np.ones(loc.shape, bool)
  others[0, 1, 0, 1, 0] = False
  np.testing.assert_allclose(got_grads[1][others], xla_grads[1][others], rtol=1e-5, atol=1e-5)
  assert np.isnan(got_out[0, 1, :d]).all() and np.isfinite(np.delete(got_out, 1, axis=1)).all()
  assert np.isnan(got_grads[2][0, 1, 0, 1, 0]) and np.isfinite(got_grads[0]).all()


def test_cxx_with_arguments_and_untrusted_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("DDETR_JAX_KERNEL_CACHE", str(tmp_path / "kernels"))
  monkeypatch.setenv("CXX", "env c++")  # a command with arguments, like "ccache g++"
  path = cpu_module.build()
  assert path.exists() and path.parent.stat().st_mode & 0o777 == 0o700
  path.chmod(0o777)  # writable by anyone: someone else could have replaced it
  with pytest.raises(RuntimeError, match="refusing to load.*writable by others"):
    cpu_module.build()
