"""The Pallas kernel (interpret=True on this CPU) against PyTorch, impl='xla', hand-computed
gradients, and its Triton lowering (exported for CUDA without a GPU)."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddetr_jax.ops import ms_deform_attn as msda_module
from ddetr_jax.ops import ms_deform_attn_pallas as pallas_module
from ddetr_jax.ops.ms_deform_attn import ms_deform_attn
from ddetr_jax.ops.ms_deform_attn_pallas import ms_deform_attn_pallas
from tests import msda_reference
from tests.msda_reference import jax_out_and_grads, random_problem, torch_out_and_grads

CASES = [  # (seed, spatial_shapes, D, P, Q, M); block_q=8, so Q is never a multiple of it
    (0, ((7, 5),), 32, 2, 11, 2),
    (1, ((1, 1), (6, 9), (3, 2)), 64, 2, 13, 1),
    (2, ((5, 11), (3, 6), (2, 3), (1, 2)), 32, 1, 9, 2),
]


@pytest.mark.parametrize("seed,shapes,d,p,q,m", CASES)
def test_forward_and_gradients_match_torch_and_xla_float64(seed, shapes, d, p, q, m):
  rng = np.random.default_rng(seed)
  value, loc, attn = random_problem(rng, shapes, b=1, q=q, m=m, d=d, p=p)  # loc in [-0.3, 1.3]
  loc[0, 0, 0, :, 0] = [1.0, 0.0]       # exact map edges
  loc[0, 1, m - 1, :, 0] = [-4.0, 7.0]  # far outside
  cot = rng.normal(size=(1, q, m * d))
  want_out, want_grads = torch_out_and_grads(value, shapes, loc, attn, cot)
  with jax.enable_x64(True):
    got_out, got_grads = jax_out_and_grads(
        lambda v, l, a: ms_deform_attn_pallas(v, shapes, l, a, block_q=8), value, loc, attn, cot)
    xla_out, xla_grads = jax_out_and_grads(
        lambda v, l, a: ms_deform_attn(v, shapes, l, a), value, loc, attn, cot)
  assert got_out.dtype == np.float64
  msda_reference.assert_matches_torch_and_xla(got_out, got_grads, want_out, want_grads,
                                              xla_out, xla_grads)


def test_value_gradient_sums_every_duplicate():
  # 20 queries x 3 points all sample the centre of pixel (y, x) = (2, 1) of a 4x3 map (weight 1
  # on that pixel alone), within one program and across three (block_q=8). The value gradient
  # there must be the sum of all 60 contributions attn * g: a dropped duplicate add shows.
  shapes = ((4, 3),)
  q, p, d = 20, 3, 32
  rng = np.random.default_rng(11)
  value = rng.normal(size=(1, 12, 1, d)).astype(np.float32)
  loc = np.broadcast_to(np.array([(1 + 0.5) / 3, (2 + 0.5) / 4], np.float32),
                        (1, q, 1, 1, p, 2)).copy()
  attn = rng.uniform(0.5, 1.5, size=(1, q, 1, 1, p)).astype(np.float32)
  cot = rng.normal(size=(1, q, d)).astype(np.float32)
  _, (grad_v, _, grad_a) = jax_out_and_grads(
      lambda v, l, a: ms_deform_attn_pallas(v, shapes, l, a, block_q=8), value, loc, attn, cot)
  want = np.einsum("qp,qd->d", attn[0, :, 0, 0].astype(np.float64), cot[0].astype(np.float64))
  np.testing.assert_allclose(grad_v[0, 2 * 3 + 1, 0], want, rtol=1e-5, atol=1e-5)
  assert np.all(np.delete(grad_v[0, :, 0], 2 * 3 + 1, axis=0) == 0.0)
  # d out / d attn = the sampled pixel itself.
  np.testing.assert_allclose(grad_a[0, :, 0, 0],
                             np.broadcast_to((cot[0] @ value[0, 7, 0])[:, None], (q, p)),
                             rtol=1e-5, atol=1e-5)
  _, torch_grads = torch_out_and_grads(value, shapes, loc, attn, cot)
  np.testing.assert_allclose(grad_v, torch_grads[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_accumulates_in_float32_and_dispatch():
  rng = np.random.default_rng(6)
  shapes = ((6, 5), (3, 3))
  value, loc, attn = random_problem(rng, shapes, b=1, q=10, m=1, d=32, dtype=np.float32)
  ref = np.asarray(ms_deform_attn(value, shapes, loc, attn))
  v16, a16 = jnp.asarray(value, jnp.bfloat16), jnp.asarray(attn, jnp.bfloat16)
  out = ms_deform_attn(v16, shapes, loc, a16, impl="pallas")
  assert out.dtype == jnp.bfloat16
  assert np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max() < 2e-2
  grads = jax.grad(lambda v, l, a: ms_deform_attn(v, shapes, l, a, impl="pallas")
                   .astype(jnp.float32).sum(), argnums=(0, 1, 2))(v16, loc, a16)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.bfloat16]
  ref_gv = jax.grad(lambda v: ms_deform_attn(v, shapes, loc, attn).sum())(value)
  assert np.abs(np.asarray(grads[0], np.float32) - ref_gv).max() / np.abs(ref_gv).max() < 2e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_to_triton_for_cuda(dtype):
  # The non-interpreted path, lowered for CUDA on this GPU-less machine: both pallas_calls must
  # become Triton kernels (catches ops that the Triton backend cannot lower).
  shapes = ((5, 7), (3, 2), (2, 2))  # L*P = 12: not a power of two
  s = sum(h * w for h, w in shapes)
  args = (jax.ShapeDtypeStruct((2, s, 2, 32), dtype),
          jax.ShapeDtypeStruct((2, 70, 2, 3, 4, 2), jnp.float32),
          jax.ShapeDtypeStruct((2, 70, 2, 3, 4), dtype))

  def fwd(v, l, a):
    return ms_deform_attn_pallas(v, shapes, l, a, interpret=False)

  def fwd_bwd(v, l, a):
    out, vjp = jax.vjp(fwd, v, l, a)
    return out, vjp(out)
  exported = jax.export.export(
      jax.jit(fwd_bwd), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  text = exported.mlir_module()
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 2
  assert "ms_deform_attn_fwd" in text and "ms_deform_attn_bwd" in text


def test_auto_resolution_per_backend_and_fallbacks_log_once(caplog, monkeypatch):
  from ddetr_jax.ops import ms_deform_attn_cpu as cpu_module  # pylint: disable=import-outside-toplevel
  msda_module.resolve_auto_impl.cache_clear()
  caplog.set_level(logging.INFO, logger="ddetr_jax.ops.ms_deform_attn")
  assert msda_module.resolve_auto_impl() == "cpu"  # this machine: CPU, with a C++ compiler
  assert msda_module.resolve_auto_impl("tpu") == "xla"
  # A CPU without a working C++ compiler.
  monkeypatch.setattr(cpu_module, "kernel_unavailable_reason", lambda: "no compiler")
  assert msda_module.resolve_auto_impl.__wrapped__("cpu") == "xla"
  # A GPU on which the kernel is unavailable (e.g. a JAX without the Triton backend).
  monkeypatch.setattr(pallas_module, "gpu_kernel_unavailable_reason", lambda: "no triton")
  assert msda_module.resolve_auto_impl("gpu") == "xla"
  assert msda_module.resolve_auto_impl("gpu") == "xla"
  monkeypatch.setattr(pallas_module, "gpu_kernel_unavailable_reason", lambda: 1 / 0)
  assert msda_module.resolve_auto_impl.__wrapped__("gpu") == "xla"  # never raises
  monkeypatch.setattr(pallas_module, "gpu_kernel_unavailable_reason", lambda: None)
  assert msda_module.resolve_auto_impl.__wrapped__("gpu") == "pallas"
  msda_module.resolve_auto_impl.cache_clear()
  lines = [r.getMessage() for r in caplog.records]
  # tpu once, cpu-without-compiler once, gpu-without-kernel once (cached), the ZeroDivision.
  assert len(lines) == 4, lines
  assert "'tpu' has no kernel" in lines[0] and "no compiler" in lines[1]
  assert "no triton" in lines[2] and "ZeroDivisionError" in lines[3]
  rng = np.random.default_rng(1)
  value, loc, attn = random_problem(rng, ((3, 4),), b=1, q=5, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(ms_deform_attn(value, ((3, 4),), loc, attn, "auto")),
                             np.asarray(ms_deform_attn(value, ((3, 4),), loc, attn, "xla")),
                             rtol=1e-6, atol=1e-6)


def test_bad_block_q_raises():
  with pytest.raises(ValueError, match="block_q"):
    ms_deform_attn_pallas(np.zeros((1, 1, 1, 4)), ((1, 1),), np.zeros((1, 1, 1, 1, 1, 2)),
                          np.zeros((1, 1, 1, 1, 1)), block_q=6)
