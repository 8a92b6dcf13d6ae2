"""`Dense`: flax's `nn.Dense` with its matmul computed as a 2-D dot.

Same module, same parameters ("kernel" (C_in, features), "bias" (features,)), same
initialisers and names, so checkpoints and the official / HF key mappings are unchanged; only
the `dot_general` it calls differs.

Why: `nn.Dense` contracts the last axis of a [..., C_in] input directly. In the backward pass
the kernel gradient is then a contraction over every leading axis (batch, queries, ...), and
XLA:CPU computed it from a transposed copy of the output gradient, fused with that gradient's
producer: a strided loop that re-evaluates the producer per element. Flattening the leading
axes first makes forward and backward plain 2-D matmuls. In the full ResNet-50 train step this
removed most of the transposing copies (README, "Training").
"""
import functools

import flax.linen as nn
import jax
from jax import lax


def flat_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                     preferred_element_type=None, **kwargs) -> jax.Array:
  """`lax.dot_general`, computed for lhs [..., K] . rhs [K, N] -> [..., N] as [-1, K] @ [K, N].

  Any other contraction is passed to `lax.dot_general` unchanged.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (lhs.ndim > 2 and rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,)
      and tuple(rhs_contract) == (0,) and not lhs_batch and not rhs_batch):
    out = lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=preferred_element_type,
                          **kwargs)
    return out.reshape(*lhs.shape[:-1], rhs.shape[1])
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


Dense = functools.partial(nn.Dense, dot_general=flat_dot_general)
