"""Multi-scale deformable attention: the sampler core of Deformable DETR.

`ms_deform_attn` computes, for every query q, head m and channel d,

    out[b, q, m*D + d] = sum_{l, p} A[b, q, m, l, p] * bilinear(V_l[b, :, :, m, d], loc[b, q, m, l, p])

where V_l is level l of `value` seen as an (H_l, W_l) map and `bilinear` is PyTorch's
`grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)` on the grid
`2 * loc - 1`: the pixel coordinate is `x = loc_x * W_l - 0.5`, and each of the four corners
that falls outside the map contributes zero. This is the same function as the official
`ms_deform_attn_core_pytorch`.

Implementation ("xla"): for every level (a short Python loop; levels have different static
shapes) and each of the four bilinear corners, one batched row gather
`table[b, (start_l + y * W + x) * M + m, :]` fetches (B, Q, M, P, D) rows (`value` reshaped to
one (B, S*M, D) table: value's own layout, no transpose and no per-level copies), which are
weighted by `attention * bilinear * in_bounds`, summed over the corners and then over P into a
(B, Q, M, D) float32 accumulator. Two details keep XLA:CPU's fused loop fast (each measured
2-5x on the whole forward): the sum over P is an unrolled sum of slices, not a reduction, and
the accumulator is the root of its own fusion (`_materialize`), so the innermost loop runs over
D with each gather index computed once per row. The gather keeps batch as a gather batch
dimension (`vmap` over B), so an array
sharded along batch stays sharded: no device ever needs another device's value map.

Why a `custom_vjp` rather than plain autodiff: autodiff of the forward would save every
gathered (B, Q, M, P, D) corner block of every level as a residual for the backward pass, i.e.
4 * L times the size of the output times P (about 1.2 GB for one 800x1066 image in the
encoder, against 64 MB of inputs and outputs). The custom backward saves only the inputs and
recomputes the gathers level by level: the same four gathers give the attention-weight and
location gradients (through the analytic derivative of the bilinear weights) and one
scatter-add per corner, all into one (B, S*M, D) buffer updated in place, gives the value
gradient. Peak temporary memory is then a few
(B, Q, M, P, D) blocks instead of 4 * L * P of them, and the backward costs about two forward
passes. Gradients follow `grid_sample`'s conventions exactly (the floor is treated as constant;
an out-of-bounds corner contributes neither value nor gradient).

Implementation ("xla_packed", a layout for TPUs): each level is first repacked so that row
(y0 + 1) * (W + 1) + (x0 + 1) holds the four bilinear corners of the cell whose top-left corner is
(x0, y0), x0 in [-1, W - 1], y0 in [-1, H - 1], concatenated as [v(y0, x0), v(y0, x0 + 1),
v(y0 + 1, x0), v(y0 + 1, x0 + 1)] with zeros for corners outside the map. One gather per
sampling point then fetches a (4 * D)-wide row (128 lanes for D = 32, a full TPU vreg row)
instead of four D-wide rows, and the zero border replaces three of the four in-bounds masks.
Memory cost: the packed copy of level l has M * (H_l + 1) * (W_l + 1) rows of 4 * D, i.e. about
4x the value tensor (4 * (H + 1)(W + 1) / (H W); 4.2x for the 800x1066 encoder levels, 73 MB
against 18 MB per image at M * D = 256 in float32), built in the forward pass and again in the
backward pass (it is recomputed, not saved). The backward scatters (4 * D)-wide rows into a
packed gradient and folds it back with four shifted adds. Results equal "xla" up to float
summation order.

Implementation ("pallas"): the fused kernel of `ms_deform_attn_pallas` (GPU via Pallas' Triton
backend; `interpret=True` elsewhere, slow, for tests).

Implementation ("cpu"): the C++ kernel of `ms_deform_attn_cpu` (an XLA FFI custom call, built
on first use with the system's C++ compiler), CPU backend only. It walks each sampling point
once with no intermediate blocks; at the 800x1066 shapes it runs the encoder forward+backward
about 2-4x faster than "xla" on this project's 2-core CPU (README, benchmarks/msda.py).

"auto": "pallas" when the default backend is a GPU and the kernel compiles there, "cpu" when it
is the CPU and the C++ kernel builds, "xla" otherwise; a fallback is logged once (python
logging, logger `ddetr_jax.ops.ms_deform_attn`).

Precision: value may be bfloat16 (or float16); sampling weights, products and sums are float32
(float64 when any input is float64) and the output is cast back to value's dtype. Gradients come back in each input's dtype.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddetr_jax import errors

SpatialShapes = tuple[tuple[int, int], ...]

IMPLS = ("xla", "xla_packed", "cpu", "pallas", "auto")

_LOG = logging.getLogger(__name__)


def _check_inputs(value, spatial_shapes, sampling_locations, attention_weights) -> SpatialShapes:
  """Validates ranks and shapes; returns spatial_shapes as a tuple of int pairs."""
  try:
    shapes = tuple((int(h), int(w)) for h, w in np.asarray(spatial_shapes).reshape(-1, 2))
  except Exception as e:  # noqa: BLE001 - re-raised with context.
    raise ValueError(
        f"spatial_shapes must be a static sequence of (H, W) int pairs, got {spatial_shapes!r}"
    ) from e
  if not shapes or any(h < 1 or w < 1 for h, w in shapes):
    raise ValueError(f"spatial_shapes must be non-empty with positive sizes, got {shapes}")
  if value.ndim != 4:
    raise ValueError(f"value must have rank 4 (B, S, M, D), got shape {value.shape}")
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError("sampling_locations must have shape (B, Q, M, L, P, 2), got "
                     f"{sampling_locations.shape}")
  if attention_weights.ndim != 5:
    raise ValueError("attention_weights must have shape (B, Q, M, L, P), got "
                     f"{attention_weights.shape}")
  b, s, m, _ = value.shape
  total = sum(h * w for h, w in shapes)
  if s != total:
    raise ValueError(f"value has S={s} positions but spatial_shapes {shapes} sum to {total}")
  bq, q, mq, lq, p, _ = sampling_locations.shape
  if (bq, mq, lq) != (b, m, len(shapes)):
    raise ValueError(
        f"sampling_locations shape {sampling_locations.shape} does not match value shape "
        f"{value.shape} (B, M) and {len(shapes)} levels (L)")
  if attention_weights.shape != (b, q, m, len(shapes), p):
    raise ValueError(
        f"attention_weights shape {attention_weights.shape} does not match sampling_locations "
        f"shape {sampling_locations.shape} (expected {(b, q, m, len(shapes), p)})")
  return shapes


def level_start_index(spatial_shapes: SpatialShapes) -> tuple[int, ...]:
  """Offsets of each level inside the flattened S axis."""
  starts, acc = [], 0
  for h, w in spatial_shapes:
    starts.append(acc)
    acc += h * w
  return tuple(starts)


def _corners(loc: jax.Array, h: int, w: int):
  """Bilinear corners of normalized locations on an (h, w) map.

  Args:
    loc: (..., 2) normalized (x, y), float32 or float64.
  Returns:
    A list of four (flat_index, weight, dweight_dx, dweight_dy) tuples, each (...,): the row
    index y * w + x (clipped into the map), the bilinear weight times the in-bounds indicator,
    and that weight's derivative w.r.t. the pixel coordinates x and y.
  """
  return corners_xy(loc[..., 0], loc[..., 1], h, w)


def _pixel_coords(loc_x: jax.Array, loc_y: jax.Array, h: int, w: int):
  """Normalized (x, y) -> pixel coordinates, top-left corner (int32) and fractions.

  Clipping far-away points changes nothing (all corners are out of bounds either way) and
  keeps the int conversion finite.
  """
  x = jnp.clip(loc_x * w - 0.5, -2.0, w + 1.0)
  y = jnp.clip(loc_y * h - 0.5, -2.0, h + 1.0)
  x0f, y0f = jnp.floor(x), jnp.floor(y)
  return x0f.astype(jnp.int32), y0f.astype(jnp.int32), x - x0f, y - y0f


def corners_xy(loc_x: jax.Array, loc_y: jax.Array, h: int, w: int):
  """`_corners` on separate (...,) x and y arrays (also traced inside the Pallas kernel)."""
  x0, y0, fx, fy = _pixel_coords(loc_x, loc_y, h, w)
  out = []
  for dy in (0, 1):
    for dx in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      wx = fx if dx else 1.0 - fx
      wy = fy if dy else 1.0 - fy
      sx = 1.0 if dx else -1.0  # d wx / dx
      sy = 1.0 if dy else -1.0  # d wy / dy
      mask = inside.astype(fx.dtype)
      idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
      out.append((idx, wx * wy * mask, sx * wy * mask, sy * wx * mask))
  return out


def _compute_dtype(*arrays) -> jnp.dtype:
  """float32 for half-precision inputs, float64 when any input is float64."""
  return jnp.result_type(jnp.float32, *[a.dtype for a in arrays])


def _gather_rows(value_l: jax.Array, idx: jax.Array) -> jax.Array:
  """value_l (B, M*HW, D), idx (B, Q, M, P) with head offsets -> (B, Q, M, P, D).

  A plain row gather per batch element (vmap keeps B a gather batch dimension, so batch
  sharding is preserved).
  """
  return jax.vmap(lambda v, i: v[i])(value_l, idx)


def _scatter_add_rows(buf: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
  """buf (B, N, D) plus the adjoint of `_gather_rows`: rows (B, Q, M, P, D) added at idx (B, Q, M, P).

  Chaining the corners' scatters into one buffer lets XLA update it in place: no zero-filled
  (B, N, D) buffer and no add pass per corner (26% of the decoder backward at batch 1).
  """
  def one(b, i, r):
    return b.at[i.reshape(-1)].add(r.reshape(-1, r.shape[-1]))
  return jax.vmap(one)(buf, idx, rows)


def _split_levels(value: jax.Array, spatial_shapes: SpatialShapes) -> list[jax.Array]:
  """value (B, S, M, D) -> per level (B, M*H*W, D), head-major rows (the packed layout's input)."""
  b, _, m, d = value.shape
  starts = level_start_index(spatial_shapes)
  return [jnp.swapaxes(value[:, s:s + h * w], 1, 2).reshape(b, m * h * w, d)
          for s, (h, w) in zip(starts, spatial_shapes)]


def _head_offsets(m: int, hw: int) -> jax.Array:
  return (jnp.arange(m, dtype=jnp.int32) * hw)[None, None, :, None]  # [1, 1, M, 1]


def _pixel_major_table(value: jax.Array) -> list[jax.Array]:
  """value (B, S, M, D) -> [(B, S*M, D)], row = (level start + pixel) * M + head: a free reshape
  of value's own layout (no transpose, and no per-level slice copies)."""
  b, s, m, d = value.shape
  return [value.reshape(b, s * m, d)]


def _pixel_major_rows(idx: jax.Array, m: int, start: int) -> jax.Array:
  """Pixel index (B, q, M, P) within a level starting at pixel `start` -> row of the table."""
  return (idx + start) * m + jnp.arange(m, dtype=jnp.int32)[None, None, :, None]


def _pack_level(value_l: jax.Array, h: int, w: int) -> jax.Array:
  """(B, M*H*W, D) -> (B, M*(H+1)*(W+1), 4*D): row (y0+1)*(W+1) + x0+1 holds the 4 corners."""
  b, _, d = value_l.shape
  v = value_l.reshape(b, -1, h, w, d)                                   # [B, M, H, W, D]
  vp = jnp.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))            # [B, M, H+2, W+2, D]
  corners = [vp[:, :, dy:dy + h + 1, dx:dx + w + 1] for dy in (0, 1) for dx in (0, 1)]
  return jnp.concatenate(corners, axis=-1).reshape(b, -1, 4 * d)       # [B, M*(H+1)*(W+1), 4D]


def _unpack_level_grad(grad_packed: jax.Array, h: int, w: int) -> jax.Array:
  """Adjoint of `_pack_level`: (B, M*(H+1)*(W+1), 4*D) -> (B, M*H*W, D)."""
  b, _, d4 = grad_packed.shape
  d = d4 // 4
  gp = grad_packed.reshape(b, -1, h + 1, w + 1, 4, d)                  # [B, M, H+1, W+1, 4, D]
  gvp = sum(jnp.pad(gp[:, :, :, :, 2 * dy + dx],
                    ((0, 0), (0, 0), (dy, 1 - dy), (dx, 1 - dx), (0, 0)))
            for dy in (0, 1) for dx in (0, 1))                          # [B, M, H+2, W+2, D]
  return gvp[:, :, 1:h + 1, 1:w + 1].reshape(b, -1, d)


def _packed_corners(loc: jax.Array, h: int, w: int):
  """Packed-row index and the four corner weights of normalized locations.

  Args:
    loc: (..., 2) normalized (x, y).
  Returns:
    (idx (...,) row in the packed (H+1)*(W+1) grid, weight (..., 4), dweight_dx (..., 4),
    dweight_dy (..., 4)), corners in the packed order (y0, x0), (y0, x0+1), (y0+1, x0),
    (y0+1, x0+1). Out-of-map corners read the zero border, so only cells with no corner in
    the map need masking.
  """
  x0, y0, fx, fy = _pixel_coords(loc[..., 0], loc[..., 1], h, w)
  mask = ((x0 >= -1) & (x0 < w) & (y0 >= -1) & (y0 < h)).astype(fx.dtype)[..., None]
  idx = (jnp.clip(y0, -1, h - 1) + 1) * (w + 1) + jnp.clip(x0, -1, w - 1) + 1
  wx0, wx1, wy0, wy1 = 1.0 - fx, fx, 1.0 - fy, fy
  wgt = jnp.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], axis=-1) * mask
  dwx = jnp.stack([-wy0, wy0, -wy1, wy1], axis=-1) * mask
  dwy = jnp.stack([-wx0, -wx1, wx0, wx1], axis=-1) * mask
  return idx, wgt, dwx, dwy


def _prepare_levels(value: jax.Array, spatial_shapes: SpatialShapes, packed: bool):
  """Value rows: per level packed (B, M*(H+1)*(W+1), 4D), else one pixel-major (B, S*M, D) table."""
  if packed:
    return [_pack_level(v, h, w)
            for v, (h, w) in zip(_split_levels(value, spatial_shapes), spatial_shapes)]
  return _pixel_major_table(value)


def _forward_chunk_packed(levels, spatial_shapes, loc, attn):
  """As `_forward_chunk` on packed levels (B, M*(H+1)*(W+1), 4D): one gather per point."""
  b, q, m = loc.shape[:3]
  d = levels[0].shape[-1] // 4
  acc = jnp.zeros((b, q, m, d), loc.dtype)
  for lvl, (packed_l, (h, w)) in enumerate(zip(levels, spatial_shapes)):
    idx, wgt, _, _ = _packed_corners(loc[:, :, :, lvl], h, w)          # [B, q, M, P(, 4)]
    rows = _gather_rows(packed_l, idx + _head_offsets(m, (h + 1) * (w + 1)))
    rows = rows.astype(loc.dtype).reshape(*idx.shape, 4, d)            # [B, q, M, P, 4, D]
    acc = acc + jnp.einsum("bqmpc,bqmpcd->bqmd", attn[:, :, :, lvl, :, None] * wgt, rows)
  return acc


def _backward_chunk_packed(levels, spatial_shapes, loc, attn, g, grad_init):
  """As `_backward_chunk` on packed levels; value gradients come back packed."""
  m = loc.shape[2]
  grad_levels, grad_locs, grad_attns = [], [], []
  for lvl, (packed_l, grad_l, (h, w)) in enumerate(zip(levels, grad_init, spatial_shapes)):
    a_l = attn[:, :, :, lvl]                                            # [B, q, M, P]
    idx, wgt, dwx, dwy = _packed_corners(loc[:, :, :, lvl], h, w)
    idx = idx + _head_offsets(m, (h + 1) * (w + 1))
    rows = _gather_rows(packed_l, idx).astype(loc.dtype)
    rows = rows.reshape(*idx.shape, 4, -1)                              # [B, q, M, P, 4, D]
    g_dot_v = jnp.einsum("bqmd,bqmpcd->bqmpc", g, rows)                 # [B, q, M, P, 4]
    grad_attns.append((wgt * g_dot_v).sum(-1))
    grad_locs.append(jnp.stack([(dwx * g_dot_v).sum(-1) * a_l * w,
                                (dwy * g_dot_v).sum(-1) * a_l * h], axis=-1))
    contrib = (a_l[..., None] * wgt)[..., None] * g[:, :, :, None, None, :]
    grad_levels.append(_scatter_add_rows(grad_l, idx, contrib.reshape(*idx.shape, -1)))
  return grad_levels, jnp.stack(grad_locs, axis=3), jnp.stack(grad_attns, axis=3)


def _forward_chunk(levels, spatial_shapes, loc, attn):
  """levels: [(B, S*M, D) table]; loc (B, q, M, L, P, 2); attn (B, q, M, L, P) -> (B, q, M, D)."""
  (table,) = levels
  b, q, m = loc.shape[:3]
  d = table.shape[-1]
  acc = jnp.zeros((b, q, m, d), loc.dtype)
  for lvl, (start, (h, w)) in enumerate(zip(level_start_index(spatial_shapes), spatial_shapes)):
    a_l = attn[:, :, :, lvl]  # [B, q, M, P]
    weighted = sum((a_l * wgt)[..., None]
                   * _gather_rows(table, _pixel_major_rows(idx, m, start)).astype(loc.dtype)
                   for idx, wgt, _, _ in _corners(loc[:, :, :, lvl], h, w))  # [B, q, M, P, D]
    acc = acc + _sum_points(weighted)
  return _materialize(acc)


def _materialize(x: jax.Array) -> jax.Array:
  """x (..., D) unchanged, made the root of its own XLA:CPU fusion (a no-op elsewhere).

  XLA:CPU fuses the gathers and the weighted sums into one loop over the elements of the
  fusion's root. With x itself as the root, the innermost loop runs over D and every gather
  index is computed once per row; when the consumer's reshape (B, q, M, D) -> (B, q, M * D) is
  fused in as the root instead, the inner loop runs over M * D and recomputes the index of every
  element (about 5x slower for the whole forward at the demo's shapes). A product with the
  identity (exact: HIGHEST precision, one nonzero term per output) is a dot, which XLA:CPU never
  fuses, so the reshape stays outside.
  """
  if jax.default_backend() != "cpu":
    return x
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return jnp.einsum("...d,de->...e", x, eye, precision=jax.lax.Precision.HIGHEST)


def _sum_points(x: jax.Array) -> jax.Array:
  """(B, q, M, P, D) -> (B, q, M, D) as an unrolled sum of the P slices.

  Same value as `x.sum(3)` or an einsum over P, but XLA:CPU fuses the gathers that produce `x`
  into a reduction over P and emits that fusion as a scalar loop (about 2.5x slower for the
  whole forward at the demo's shapes); a sum of slices stays an elementwise loop fusion.
  """
  return functools.reduce(jnp.add, [x[:, :, :, p] for p in range(x.shape[3])])


def _backward_chunk(levels, spatial_shapes, loc, attn, g, grad_init):
  """Gradients of one query chunk; g (B, q, M, D).

  The value gradient is scattered into `grad_init` ([(B, S*M, D)]: zeros, or the running sum
  over earlier chunks), so a chunked backward updates one buffer in place instead of
  zero-filling and adding a full-size gradient per chunk.

  Returns ([(B, S*M, D) value-gradient table], (B, q, M, L, P, 2), (B, q, M, L, P)).
  """
  (table,) = levels
  m = loc.shape[2]
  (grad_table,) = grad_init
  grad_locs, grad_attns = [], []
  for lvl, (start, (h, w)) in enumerate(zip(level_start_index(spatial_shapes), spatial_shapes)):
    a_l = attn[:, :, :, lvl]  # [B, q, M, P]
    grad_a = jnp.zeros_like(a_l)
    grad_x = jnp.zeros_like(a_l)
    grad_y = jnp.zeros_like(a_l)
    for idx, wgt, dwx, dwy in _corners(loc[:, :, :, lvl], h, w):
      idx = _pixel_major_rows(idx, m, start)
      rows = _gather_rows(table, idx).astype(loc.dtype)  # [B, q, M, P, D]
      g_dot_v = jnp.einsum("bqmd,bqmpd->bqmp", g, rows)              # [B, q, M, P]
      grad_a = grad_a + wgt * g_dot_v
      grad_x = grad_x + dwx * g_dot_v
      grad_y = grad_y + dwy * g_dot_v
      contrib = (a_l * wgt)[..., None] * g[:, :, :, None, :]         # [B, q, M, P, D]
      grad_table = _scatter_add_rows(grad_table, idx, contrib)
    grad_attns.append(grad_a)
    # d x / d loc_x = W and d y / d loc_y = H. A clipped coordinate has no in-bounds corner,
    # so its weight derivatives are zero already.
    grad_locs.append(jnp.stack([grad_x * a_l * w, grad_y * a_l * h], axis=-1))
  return [grad_table], jnp.stack(grad_locs, axis=3), jnp.stack(grad_attns, axis=3)


# Queries are processed in chunks of this many (a sequential loop), so the gathered
# (B, chunk, M, P, D) blocks stay small whatever Q is.
QUERY_CHUNK = 1024


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
  """(B, Q, ...) -> (n, B, chunk, ...) zero-padded along Q."""
  q = x.shape[1]
  n = -(-q // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - q)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)


def _unchunked(x: jax.Array, q: int) -> jax.Array:
  """(n, B, chunk, ...) -> (B, Q, ...)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :q]


def _forward(value, spatial_shapes, packed, sampling_locations, attention_weights):
  b, _, m, d = value.shape
  q = sampling_locations.shape[1]
  ct = _compute_dtype(value, sampling_locations, attention_weights)
  loc = sampling_locations.astype(ct)
  attn = attention_weights.astype(ct)
  levels = _prepare_levels(value, spatial_shapes, packed)
  chunk_fn = _forward_chunk_packed if packed else _forward_chunk
  if q <= QUERY_CHUNK:
    out = chunk_fn(levels, spatial_shapes, loc, attn)
  else:
    chunks = jax.lax.map(lambda la: chunk_fn(levels, spatial_shapes, *la),
                         (_chunked(loc, QUERY_CHUNK), _chunked(attn, QUERY_CHUNK)))
    out = _unchunked(chunks, q)
  return out.reshape(b, q, m * d).astype(value.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _ms_deform_attn_xla(value, spatial_shapes, packed, sampling_locations, attention_weights):
  return _forward(value, spatial_shapes, packed, sampling_locations, attention_weights)


def _fwd(value, spatial_shapes, packed, sampling_locations, attention_weights):
  out = _forward(value, spatial_shapes, packed, sampling_locations, attention_weights)
  return out, (value, sampling_locations, attention_weights)


def _bwd(spatial_shapes, packed, residuals, g):
  value, sampling_locations, attention_weights = residuals
  b, _, m, d = value.shape
  q = sampling_locations.shape[1]
  ct = _compute_dtype(value, sampling_locations, attention_weights)
  g = g.reshape(b, q, m, d).astype(ct)  # [B, Q, M, D]
  loc = sampling_locations.astype(ct)
  attn = attention_weights.astype(ct)
  levels = _prepare_levels(value, spatial_shapes, packed)
  chunk_fn = _backward_chunk_packed if packed else _backward_chunk
  init = [jnp.zeros(v.shape, ct) for v in levels]
  if q <= QUERY_CHUNK:
    grad_levels, grad_loc, grad_attn = chunk_fn(levels, spatial_shapes, loc, attn, g, init)
  else:
    def step(acc, xs):
      gl, gloc, gattn = chunk_fn(levels, spatial_shapes, *xs, acc)
      return gl, (gloc, gattn)
    grad_levels, (gloc, gattn) = jax.lax.scan(
        step, init, tuple(_chunked(x, QUERY_CHUNK) for x in (loc, attn, g)))
    grad_loc, grad_attn = _unchunked(gloc, q), _unchunked(gattn, q)
  if packed:
    grad_levels = [jnp.swapaxes(_unpack_level_grad(gp, h, w).reshape(b, m, h * w, d), 1, 2)
                   for gp, (h, w) in zip(grad_levels, spatial_shapes)]
    grad_value = jnp.concatenate(grad_levels, axis=1)  # [B, S, M, D]
  else:
    grad_value = grad_levels[0].reshape(value.shape)  # [B, S, M, D]
  return (grad_value.astype(value.dtype), grad_loc.astype(sampling_locations.dtype),
          grad_attn.astype(attention_weights.dtype))


_ms_deform_attn_xla.defvjp(_fwd, _bwd)


def ms_deform_attn(value: jax.Array,
                   spatial_shapes: Sequence[Sequence[int]],
                   sampling_locations: jax.Array,
                   attention_weights: jax.Array,
                   impl: str = "xla") -> jax.Array:
  """Multi-scale deformable attention sampling.

  Args:
    value: (B, S, M, D) per-head values of all levels, S = sum_l H_l * W_l, levels in order.
    spatial_shapes: static ((H_0, W_0), ..., (H_{L-1}, W_{L-1})) Python ints.
    sampling_locations: (B, Q, M, L, P, 2) normalized (x, y); any finite value is legal,
      locations outside [0, 1] read zeros.
    attention_weights: (B, Q, M, L, P) weights (softmax over L*P in the model).
    impl: "xla" (gather-based, this module), "xla_packed" (the same with the four corners
      packed in one row, for TPUs), "cpu" (the C++ kernel, CPU backend only), "pallas" (the
      fused kernel; interpreted off GPU) or "auto" ("pallas" on a GPU where the kernel
      compiles, "cpu" on the CPU where the C++ kernel builds, else "xla").

  Returns:
    (B, Q, M * D) in value's dtype.
  """
  shapes = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
  if impl not in IMPLS:
    raise errors.InvalidInputError(f"sampler impl (config.model.attention_impl) must be one of "
                                   f"{IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = resolve_auto_impl()
  if impl == "cpu":
    if jax.default_backend() != "cpu":
      raise errors.InvalidInputError(f"impl='cpu' runs on the CPU backend only; the default backend is "
                       f"{jax.default_backend()!r} (use impl='auto')")
    from ddetr_jax.ops import ms_deform_attn_cpu  # pylint: disable=import-outside-toplevel
    return ms_deform_attn_cpu.ms_deform_attn_cpu(value, shapes, sampling_locations,
                                                 attention_weights)
  if impl == "pallas":
    from ddetr_jax.ops import ms_deform_attn_pallas  # pylint: disable=import-outside-toplevel
    return ms_deform_attn_pallas.ms_deform_attn_pallas(
        value, shapes, sampling_locations, attention_weights)
  return _ms_deform_attn_xla(value, shapes, impl == "xla_packed", sampling_locations,
                             attention_weights)


@functools.lru_cache(maxsize=None)
def resolve_auto_impl(backend: str | None = None) -> str:
  """The implementation `impl="auto"` runs on `backend` (default: JAX's default backend).

  GPU: "pallas" when the Pallas kernel compiles there
  (`ms_deform_attn_pallas.gpu_kernel_unavailable_reason`); CPU: "cpu" when the C++ kernel
  builds (`ms_deform_attn_cpu.kernel_unavailable_reason`); "xla" otherwise. Falling back is
  logged once per backend (the result is cached); it never raises.
  """
  backend = backend or jax.default_backend()
  if backend not in ("gpu", "cpu"):
    _LOG.info("ms_deform_attn impl='auto': backend %r has no kernel, using 'xla'", backend)
    return "xla"
  kernel = "pallas" if backend == "gpu" else "cpu"
  try:
    if backend == "gpu":
      from ddetr_jax.ops import ms_deform_attn_pallas  # pylint: disable=import-outside-toplevel
      reason = ms_deform_attn_pallas.gpu_kernel_unavailable_reason()
    else:
      from ddetr_jax.ops import ms_deform_attn_cpu  # pylint: disable=import-outside-toplevel
      reason = ms_deform_attn_cpu.kernel_unavailable_reason()
  except Exception as e:  # noqa: BLE001 - any failure means: use xla.
    reason = f"{type(e).__name__}: {e}"
  if reason:
    _LOG.warning("ms_deform_attn impl='auto': the %r kernel is unavailable on %s with jax %s "
                 "(%s), using 'xla'", kernel, backend, jax.__version__, reason)
    return "xla"
  return kernel
