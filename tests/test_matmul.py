"""models/matmul.py: float32 is a plain matmul; bfloat16 rounds the operands, accumulates in float32
(forward and both gradients) and keeps the kernel gradient float32. Reference: torch in float64
on the same rounded operands."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddetr_jax.models.matmul import matmul

BF16_ULP = 2.0 ** -8  # relative spacing of bfloat16 (8-bit significand)


def _inputs(m=37, k=300, n=24, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32),
          rng.normal(size=(n,)).astype(np.float32), rng.normal(size=(m, n)).astype(np.float32))


def _round_bf16(a):
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))


def _torch64(x, kernel, bias, cotangent):
  """(out, dx, dkernel, dbias) of x @ kernel + bias in float64."""
  tx, tk, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, kernel, bias))
  out = tx @ tk + tb
  out.backward(torch.tensor(cotangent, dtype=torch.float64))
  return out.detach().numpy(), tx.grad.numpy(), tk.grad.numpy(), tb.grad.numpy()


def test_float32_is_a_plain_matmul_with_bias():
  x, kernel, bias, cotangent = _inputs()
  out, vjp = jax.vjp(lambda x, k, b: matmul(x, k, b), x, kernel, bias)
  got = (out,) + vjp(jnp.asarray(cotangent))
  for ours, ref in zip(got, _torch64(x, kernel, bias, cotangent)):
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(matmul(x, kernel), jnp.dot(x, kernel))


def test_bfloat16_rounds_operands_accumulates_in_float32_and_rounds_once():
  x, kernel, bias, cotangent = _inputs()
  out, vjp = jax.vjp(lambda x, k, b: matmul(x, k, b, jnp.bfloat16), x.astype(jnp.bfloat16),
                     kernel, bias)
  dx, dkernel, dbias = vjp(jnp.asarray(cotangent, jnp.bfloat16))
  assert (out.dtype, dx.dtype, dkernel.dtype, dbias.dtype) == (
      jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32)
  ref_out, ref_dx, ref_dk, ref_db = _torch64(_round_bf16(x), _round_bf16(kernel), bias,
                                             _round_bf16(cotangent))
  # One rounding of a float32-accurate result: within one bf16 spacing of the exact value.
  for ours, ref in ((out, ref_out), (dx, ref_dx)):
    err = np.abs(np.asarray(ours, np.float32) - ref)
    assert np.all(err <= BF16_ULP * np.abs(ref) + 1e-6), float(np.max(err / np.abs(ref)))
  # The kernel and bias gradients are never rounded to bf16: float32 accuracy. (A bf16 result,
  # as flax's nn.Dense(dtype=bfloat16) gives, would be off by up to 2**-9 relative.)
  np.testing.assert_allclose(np.asarray(dkernel), ref_dk, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dbias), ref_db, rtol=1e-5, atol=1e-5)


def test_bfloat16_every_dot_takes_bf16_operands_and_returns_float32():
  """The reason for the custom VJP: JAX's transpose of a bf16 -> float32 dot would contract the
  float32 output gradient with a bf16 operand, which XLA:CPU computes in float32."""
  x, kernel, bias, _ = _inputs()
  loss = lambda x, k, b: jnp.sum(jnp.sin(matmul(x, k, b, jnp.bfloat16).astype(jnp.float32)))
  text = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x.astype(jnp.bfloat16), kernel, bias).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) == 3  # forward, input gradient, kernel gradient
  for line in dots:
    operands, result = line.split(":")[-1].split("->")
    assert operands.count("bf16") == 2 and result.strip().endswith("xf32>"), line


def test_compute_dtype_must_be_float32_or_16_bit():
  x, kernel, _, _ = _inputs()
  with pytest.raises(ValueError, match="int8"):
    matmul(x, kernel, dtype=jnp.int8)


def test_same_values_under_jit_and_vmap():
  x, kernel, bias, _ = _inputs()
  f = lambda x: matmul(x, kernel, bias, jnp.bfloat16)
  batched = jnp.stack([x, 2 * x]).astype(jnp.bfloat16)
  np.testing.assert_array_equal(jax.jit(jax.vmap(f))(batched)[1], jax.jit(f)(batched[1]))
