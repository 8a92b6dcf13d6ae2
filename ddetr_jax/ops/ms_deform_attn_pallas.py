"""Multi-scale deformable attention as a fused Pallas kernel (forward and backward).

Same function, arguments and semantics as `ms_deform_attn.ms_deform_attn` (PyTorch's
`grid_sample` bilinear, zeros padding, align_corners=False; out-of-map corners contribute
nothing); the corner arithmetic is the very `ms_deform_attn.corners_xy` the XLA path uses.

GPU lowering: Pallas' Triton backend (`jax.experimental.pallas.triton`, selected by passing its
`CompilerParams`), written for and tested with JAX 0.10.2, where the Triton backend is still
shipped; its tests also passed, compiled by Triton, with JAX 0.11.2 on an NVIDIA H200
(2026-12-04). JAX deprecates it from 0.11 in favour of Mosaic GPU; where it is missing or the kernel
fails to compile, `impl="auto"` falls back to "xla" (`gpu_kernel_unavailable_reason`). Off GPU
the same kernel body runs with `interpret=True` (slow; for tests).

Layout: value is transposed once to (B*M, S, Dp) (Dp = D rounded up to a power of two, as
Triton needs power-of-two tiles); locations and weights to (B*M, 2, L*P, Qp) and (B*M, L*P, Qp)
with Q zero-padded to a multiple of the query block (padded queries have weight 0).

Forward: grid (Qp / BLOCK_Q, B*M); one program owns BLOCK_Q queries of one (batch, head). For
each level and point (unrolled, L*P <= 16 in the model) it computes the four corners of the
BLOCK_Q locations, gathers each corner as a (BLOCK_Q, Dp) tile of rows from the value map,
scales it by attention weight x bilinear weight x in-bounds and accumulates in float32 (float64
for float64 inputs). bfloat16 / float16 values are read as they are and converted per tile.

Backward (`jax.custom_vjp`; the residuals are just the inputs): the same grid recomputes the
gathers. The location and attention-weight gradients are per (query, level, point), so each
program writes its own tiles. The value gradient is a scatter: many queries (of this program and
of others) read the same value row. We use atomic adds (`triton.atomic_add` of the (BLOCK_Q,
Dp) contribution tile into a float32 (float64) zero-initialised buffer aliased in place),
the same choice as the official CUDA kernel: one pass, no extra memory beyond the float32
gradient, and fast. The price is run-to-run nondeterminism of the float summation order in the
value gradient (differences at the rounding level, ~1e-7 relative). The deterministic
alternatives cost a lot more here: sorting the B*M*Q*L*P*4 (index, contribution) pairs and a
segmented reduction (a sort of ~70M keys per encoder call), or an inverse "pixel owns its
queries" map, which is data dependent. When bitwise reproducibility matters use impl="xla" with
XLA's deterministic scatter (`--xla_gpu_deterministic_ops`).

Interpret mode: Pallas' interpreter implements an atomic add with array indices as
`ref.at[idx].set(ref[idx] + val)`, which keeps only one of several updates to the same row
(and does not support mixed array/slice indices). So when interpreting, the kernel instead adds
the tile with a duplicate-safe `ref[...] = ref[...].at[idx].add(tile)`; programs run one after
another there, so there is no race. The tests include many queries sampling one pixel so that a
dropped duplicate cannot hide.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ddetr_jax.ops.ms_deform_attn import (SpatialShapes, _check_inputs, _compute_dtype,
                                          corners_xy, level_start_index)

try:  # The GPU (Triton) backend; absent or deprecated in some JAX versions.
  from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - depends on the installed JAX.
  pl_triton = None

# Queries per program. A power of two (Triton tiles); 64 keeps the (BLOCK_Q, D) gather tiles in
# registers for D <= 64.
BLOCK_Q = 64
NUM_WARPS = 4


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _scale(x: jax.Array) -> jax.Array:
  return x[:, None]


def _level_points(loc_ref, attn_ref, spatial_shapes, num_points: int, ct):
  """Yields, for every (level, point) of the tile (unrolled at trace time),
  (H, W, level start row, row lp = level * P + point, loc_x [BQ], loc_y [BQ], attention [BQ])."""
  for lvl, ((h, w), start) in enumerate(zip(spatial_shapes, level_start_index(spatial_shapes))):
    for p in range(num_points):
      lp = lvl * num_points + p
      yield (h, w, start, lp, loc_ref[0, lp, :].astype(ct), loc_ref[1, lp, :].astype(ct),
             attn_ref[lp, :].astype(ct))


def _forward_kernel(value_ref, loc_ref, attn_ref, out_ref, *, spatial_shapes, num_points, ct):
  """value_ref (S, Dp), loc_ref (2, L*P, BQ), attn_ref (L*P, BQ) -> out_ref (BQ, Dp)."""
  acc = jnp.zeros(out_ref.shape, ct)                                    # [BQ, Dp]
  for h, w, start, _, loc_x, loc_y, a in _level_points(loc_ref, attn_ref, spatial_shapes,
                                                       num_points, ct):
    for idx, wgt, _, _ in corners_xy(loc_x, loc_y, h, w):
      rows = value_ref[idx + start, :].astype(ct)                       # [BQ, Dp] gather
      acc = acc + _scale(a * wgt) * rows
  out_ref[...] = acc.astype(out_ref.dtype)


def _scatter_add_rows(ref, idx: jax.Array, rows: jax.Array, interpret: bool) -> None:
  """ref[idx[i], :] += rows[i, :] for every i, duplicates included (see module docstring)."""
  if interpret:
    ref[...] = ref[...].at[idx].add(rows)
  else:
    cols = jnp.arange(rows.shape[1], dtype=jnp.int32)
    pl_triton.atomic_add(ref, (idx[:, None], cols[None, :]), rows)


def _backward_kernel(value_ref, loc_ref, attn_ref, g_ref, _, grad_value_ref, grad_loc_ref,
                     grad_attn_ref, *, spatial_shapes, num_points, ct, interpret):
  """g_ref (BQ, Dp); grad_value_ref (S, Dp) accumulated in place (aliased zeros);
  grad_loc_ref (2, L*P, BQ) and grad_attn_ref (L*P, BQ) written per tile."""
  g = g_ref[...].astype(ct)                                             # [BQ, Dp]
  for h, w, start, lp, loc_x, loc_y, a in _level_points(loc_ref, attn_ref, spatial_shapes,
                                                        num_points, ct):
    grad_a = jnp.zeros_like(a)
    grad_x = jnp.zeros_like(a)
    grad_y = jnp.zeros_like(a)
    for idx, wgt, dwx, dwy in corners_xy(loc_x, loc_y, h, w):
      rows = value_ref[idx + start, :].astype(ct)                       # [BQ, Dp] gather
      g_dot_v = jnp.sum(g * rows, axis=1)                               # [BQ]
      grad_a = grad_a + wgt * g_dot_v
      grad_x = grad_x + dwx * g_dot_v
      grad_y = grad_y + dwy * g_dot_v
      _scatter_add_rows(grad_value_ref, idx + start, _scale(a * wgt) * g, interpret)
    grad_attn_ref[lp, :] = grad_a.astype(grad_attn_ref.dtype)
    grad_loc_ref[0, lp, :] = (grad_x * a * w).astype(grad_loc_ref.dtype)
    grad_loc_ref[1, lp, :] = (grad_y * a * h).astype(grad_loc_ref.dtype)


def _layout(value, sampling_locations, attention_weights, block_q):
  """Kernel layouts: (B*M, S, Dp), (B*M, 2, L*P, Qp), (B*M, L*P, Qp)."""
  b, s, m, d = value.shape
  _, q, _, num_levels, p, _ = sampling_locations.shape
  qp = -(-q // block_q) * block_q
  dp = _next_pow2(d)
  v = jnp.swapaxes(value, 1, 2).reshape(b * m, s, d)                    # [B*M, S, D]
  if dp != d:
    v = jnp.pad(v, ((0, 0), (0, 0), (0, dp - d)))
  loc = jnp.transpose(sampling_locations, (0, 2, 5, 3, 4, 1))           # [B, M, 2, L, P, Q]
  loc = loc.reshape(b * m, 2, num_levels * p, q)
  attn = jnp.transpose(attention_weights, (0, 2, 3, 4, 1))              # [B, M, L, P, Q]
  attn = attn.reshape(b * m, num_levels * p, q)
  loc = jnp.pad(loc, ((0, 0), (0, 0), (0, 0), (0, qp - q)))
  attn = jnp.pad(attn, ((0, 0), (0, 0), (0, qp - q)))
  return v, loc, attn


def _specs(s, dp, lp, block_q):
  value = pl.BlockSpec((None, s, dp), lambda i, j: (j, 0, 0))
  loc = pl.BlockSpec((None, 2, lp, block_q), lambda i, j: (j, 0, 0, i))
  attn = pl.BlockSpec((None, lp, block_q), lambda i, j: (j, 0, i))
  rows = pl.BlockSpec((None, block_q, dp), lambda i, j: (j, i, 0))
  return value, loc, attn, rows


def _compiler_params(interpret: bool):
  if interpret or pl_triton is None:
    return None
  return pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _forward(value, spatial_shapes, block_q, interpret, sampling_locations, attention_weights):
  b, s, m, d = value.shape
  q, num_levels, p = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
  ct = _compute_dtype(value, sampling_locations, attention_weights)
  v, loc, attn = _layout(value, sampling_locations, attention_weights, block_q)
  qp, dp = loc.shape[-1], v.shape[-1]
  value_spec, loc_spec, attn_spec, rows_spec = _specs(s, dp, num_levels * p, block_q)
  kernel = functools.partial(_forward_kernel, spatial_shapes=spatial_shapes, num_points=p, ct=ct)
  out = pl.pallas_call(
      kernel, grid=(qp // block_q, b * m),
      in_specs=[value_spec, loc_spec, attn_spec], out_specs=rows_spec,
      out_shape=jax.ShapeDtypeStruct((b * m, qp, dp), value.dtype),
      interpret=interpret, compiler_params=_compiler_params(interpret),
      name="ms_deform_attn_fwd")(v, loc, attn)                         # [B*M, Qp, Dp]
  out = out.reshape(b, m, qp, dp)[:, :, :q, :d]
  return jnp.swapaxes(out, 1, 2).reshape(b, q, m * d)


def _backward(value, spatial_shapes, block_q, interpret, sampling_locations, attention_weights,
              g):
  b, s, m, d = value.shape
  q, num_levels, p = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
  ct = _compute_dtype(value, sampling_locations, attention_weights)
  v, loc, attn = _layout(value, sampling_locations, attention_weights, block_q)
  qp, dp, lp = loc.shape[-1], v.shape[-1], num_levels * p
  g = jnp.swapaxes(g.reshape(b, q, m, d), 1, 2).reshape(b * m, q, d)  # [B*M, Q, D]
  g = jnp.pad(g, ((0, 0), (0, qp - q), (0, dp - d)))
  value_spec, loc_spec, attn_spec, rows_spec = _specs(s, dp, lp, block_q)
  kernel = functools.partial(_backward_kernel, spatial_shapes=spatial_shapes, num_points=p,
                             ct=ct, interpret=interpret)
  grad_v, grad_loc, grad_attn = pl.pallas_call(
      kernel, grid=(qp // block_q, b * m),
      in_specs=[value_spec, loc_spec, attn_spec, rows_spec, value_spec],
      out_specs=[value_spec, loc_spec, attn_spec],
      out_shape=[jax.ShapeDtypeStruct((b * m, s, dp), ct),
                 jax.ShapeDtypeStruct(loc.shape, ct),
                 jax.ShapeDtypeStruct(attn.shape, ct)],
      input_output_aliases={4: 0},  # zero-initialised value-gradient buffer, added in place
      interpret=interpret, compiler_params=_compiler_params(interpret),
      name="ms_deform_attn_bwd")(v, loc, attn, g, jnp.zeros((b * m, s, dp), ct))
  grad_v = jnp.swapaxes(grad_v[..., :d].reshape(b, m, s, d), 1, 2)      # [B, S, M, D]
  grad_loc = grad_loc[..., :q].reshape(b, m, 2, num_levels, p, q)
  grad_loc = jnp.transpose(grad_loc, (0, 5, 1, 3, 4, 2))                # [B, Q, M, L, P, 2]
  grad_attn = grad_attn[..., :q].reshape(b, m, num_levels, p, q)
  grad_attn = jnp.transpose(grad_attn, (0, 4, 1, 2, 3))                 # [B, Q, M, L, P]
  return (grad_v.astype(value.dtype), grad_loc.astype(sampling_locations.dtype),
          grad_attn.astype(attention_weights.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _ms_deform_attn_pallas(value, spatial_shapes, block_q, interpret, sampling_locations,
                           attention_weights):
  return _forward(value, spatial_shapes, block_q, interpret, sampling_locations,
                  attention_weights)


def _fwd(value, spatial_shapes, block_q, interpret, sampling_locations, attention_weights):
  out = _forward(value, spatial_shapes, block_q, interpret, sampling_locations,
                 attention_weights)
  return out, (value, sampling_locations, attention_weights)


def _bwd(spatial_shapes, block_q, interpret, residuals, g):
  return _backward(residuals[0], spatial_shapes, block_q, interpret, *residuals[1:], g)


_ms_deform_attn_pallas.defvjp(_fwd, _bwd)


def ms_deform_attn_pallas(value: jax.Array,
                          spatial_shapes: SpatialShapes,
                          sampling_locations: jax.Array,
                          attention_weights: jax.Array,
                          *,
                          block_q: int | None = None,
                          interpret: bool | None = None) -> jax.Array:
  """Multi-scale deformable attention with the fused Pallas kernel.

  Args:
    value: (B, S, M, D) per-head values of all levels, S = sum_l H_l * W_l.
    spatial_shapes: static ((H_0, W_0), ...) Python ints.
    sampling_locations: (B, Q, M, L, P, 2) normalized (x, y); outside [0, 1] reads zeros.
    attention_weights: (B, Q, M, L, P).
    block_q: queries per program, a power of two (default `BLOCK_Q`).
    interpret: run the kernel in the Pallas interpreter; default: when the backend is not GPU.

  Returns:
    (B, Q, M * D) in value's dtype; differentiable in value, locations and weights.
  """
  shapes = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
  block_q = BLOCK_Q if block_q is None else int(block_q)
  if block_q < 1 or block_q & (block_q - 1):
    raise ValueError(f"block_q must be a positive power of two, got {block_q}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if not interpret and pl_triton is None:
    raise RuntimeError(f"jax {jax.__version__} has no Pallas Triton backend "
                       "(jax.experimental.pallas.triton); use impl='xla' or 'auto'")
  return _ms_deform_attn_pallas(value, shapes, block_q, bool(interpret), sampling_locations,
                                attention_weights)


@functools.lru_cache(maxsize=None)
def gpu_kernel_unavailable_reason() -> str | None:
  """None when the kernel compiles and runs on the default (GPU) backend, else why not."""
  if pl_triton is None:
    return "jax.experimental.pallas.triton is not available"
  if jax.default_backend() != "gpu":
    return f"default backend is {jax.default_backend()!r}, not 'gpu'"
  try:
    shapes = ((3, 5), (2, 2))
    value = jnp.ones((1, 19, 1, 32), jnp.float32)
    loc = jnp.full((1, 5, 1, 2, 2, 2), 0.4, jnp.float32)
    attn = jnp.ones((1, 5, 1, 2, 2), jnp.float32)

    def probe(v, l, a):
      return ms_deform_attn_pallas(v, shapes, l, a, interpret=False).sum()
    jax.block_until_ready(jax.jit(jax.value_and_grad(probe, argnums=(0, 1, 2)))(value, loc, attn))
  except Exception as e:  # noqa: BLE001 - any failure means: not available.
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None
