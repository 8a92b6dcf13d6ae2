"""Benchmark: multi-scale deformable attention, JAX impls vs the PyTorch grid_sample formulation.

Shapes are those of an image (default 800x1066; --image 800x1333 for the GPU targets) through
ResNet-50 (strides 8, 16, 32 and a stride-2 conv on the last: (100,134), (50,67), (25,34),
(13,17) for 800x1066; M=8 heads, D=32, L=4, P=4): the encoder (Q = S = 17821) and the decoder
(Q = 300), at the given batches and dtypes. One column set per JAX impl available on the
machine (xla, xla_packed everywhere, pallas on a GPU, cpu (the C++ kernel) on the CPU; pallas in
interpret mode only if asked for with --impls). Torch runs on the CPU with all threads, float32 only. Times are medians after
warm-up. JAX temporary memory is XLA's compiled `memory_analysis()`.

Analytic floor per shape (independent of the implementation):
  bytes: what must cross memory at least once: fwd = value + locations + weights + output;
    fwd+bwd = those + the output cotangent + the three input gradients (value read once, no
    re-reads of gathered rows, no intermediates).
  FLOPs: fwd = 8 * D per (b, q, m, l, p) sample (4 corners x D multiply-adds); the backward adds
    16 * D per sample (4 corners x (D-long dot with the cotangent + D multiply-adds into the
    value gradient)); the ~40 scalar ops per sample for corner weights are left out.
"GB/s" is floor bytes / measured time: compare with the device's memory bandwidth (a time within
3x of the bandwidth floor means GB/s >= bandwidth / 3).

  python benchmarks/msda.py [--repeats 5] [--impls xla,xla_packed] [--batches 1,2] [--malloc tuned]
                            [--locations uniform|local]
                            [--dtypes fp32,bf16] [--image 800x1066] [--no_torch]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ddetr_jax import host_malloc, xla_gpu_flags  # noqa: E402

_MALLOC_CHOICES = ("tuned", "default")


def _malloc_choice(argv) -> str:
  """The --malloc value, read before jax and torch are imported (main() checks it again)."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--malloc", default="tuned", choices=_MALLOC_CHOICES)
  return parser.parse_known_args(argv)[0].malloc


# Before torch and jax start their threads: glibc keeps the arena a thread already has.
_MALLOC_TUNED = (__name__ == "__main__" and _malloc_choice(sys.argv[1:]) == "tuned"
                 and host_malloc.tune())
if __name__ == "__main__":
  xla_gpu_flags.disable_triton_gemm()  # as train.py, before JAX's first backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddetr_jax.models.deformable_attention import sampling_offsets_bias  # noqa: E402
from ddetr_jax.models.transformer import encoder_reference_points  # noqa: E402
from ddetr_jax.ops.ms_deform_attn import ms_deform_attn  # noqa: E402
from tests.msda_reference import ms_deform_attn_torch  # noqa: E402

M, D, P = 8, 32, 4
DTYPES = {"fp32": np.float32, "bf16": jnp.bfloat16}


def image_levels(height: int, width: int) -> tuple[tuple[int, int], ...]:
  """ResNet-50 C3-C5 (strides 8, 16, 32, each 'same' conv rounding up) and a stride-2 C6."""
  levels = [(math.ceil(height / s), math.ceil(width / s)) for s in (8, 16, 32)]
  levels.append((math.ceil(levels[-1][0] / 2), math.ceil(levels[-1][1] / 2)))
  return tuple(levels)


LEVELS = image_levels(800, 1066)


def analytic_floor(batch: int, q: int, s: int, value_itemsize: int, loc_itemsize: int = 4):
  """(fwd bytes, fwd+bwd bytes, fwd FLOPs, fwd+bwd FLOPs) that any implementation must pay."""
  num_levels = len(LEVELS)
  value = batch * s * M * D * value_itemsize
  loc = batch * q * M * num_levels * P * 2 * loc_itemsize
  attn = batch * q * M * num_levels * P * value_itemsize
  out = batch * q * M * D * value_itemsize
  samples = batch * q * M * num_levels * P
  fwd_bytes = value + loc + attn + out
  return fwd_bytes, 2 * fwd_bytes + out, 8 * D * samples, 24 * D * samples


def available_impls() -> list[str]:
  impls = ["xla", "xla_packed"]
  if jax.default_backend() == "gpu":
    impls.append("pallas")
  if jax.default_backend() == "cpu":
    from ddetr_jax.ops import ms_deform_attn_cpu  # pylint: disable=import-outside-toplevel
    if ms_deform_attn_cpu.kernel_unavailable_reason() is None:
      impls.append("cpu")
  return impls


def _median_time(fn, repeats: int) -> float:
  fn()  # warm-up (and compile)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _reference_points(q: int, rng: np.random.Generator) -> np.ndarray:
  """(q, 2) normalized (x, y) reference points: for the encoder (q = S) each query's own pixel
  centre, the model's `encoder_reference_points` (unpadded images), for the decoder uniform
  over the image (drawn from rng)."""
  if q != sum(h * w for h, w in LEVELS):
    return rng.uniform(size=(q, 2))
  refs = encoder_reference_points(LEVELS, jnp.ones((1, len(LEVELS), 2), jnp.float32))
  return np.asarray(refs[0, :, 0], np.float64)  # [S, 2]: the same on every level when unpadded


def _inputs(batch: int, q: int, seed: int = 0, locations: str = "uniform"):
  """value (B, S, M, D), sampling_locations (B, Q, M, L, P, 2), attention_weights (B, Q, M, L, P).

  locations="uniform": every sampling location uniform over [0, 1]^2, independent of the query
  (no locality at all: the worst case for caches). locations="local": as the model samples,
  reference point + offset / (W_l, H_l), the offset being the official initial pattern (head m
  looks along angle 2*pi*m/M, point p at distance p + 1 pixels) plus N(0, 2^2) pixels of noise.
  """
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in LEVELS)
  value = rng.normal(size=(batch, s, M, D)).astype(np.float32)
  if locations == "uniform":
    loc = rng.uniform(size=(batch, q, M, len(LEVELS), P, 2)).astype(np.float32)
  elif locations == "local":
    grid = sampling_offsets_bias(M, len(LEVELS), P).reshape(M, len(LEVELS), P, 2)
    offsets = grid + rng.normal(scale=2.0, size=(batch, q, M, len(LEVELS), P, 2))
    sizes = np.array([(w, h) for h, w in LEVELS], np.float64)[:, None, :]  # [L, 1, 2]
    refs = _reference_points(q, rng)[None, :, None, None, None, :]        # [1, Q, 1, 1, 1, 2]
    loc = (refs + offsets / sizes).astype(np.float32)
  else:
    raise ValueError(f"locations must be 'uniform' or 'local', got {locations!r}")
  attn = rng.uniform(size=(batch, q, M, len(LEVELS), P)).astype(np.float32)
  attn /= attn.sum(axis=(-1, -2), keepdims=True)
  return value, loc, attn


def bench_jax(impl: str, value, loc, attn, repeats: int, dtype=np.float32):
  """Returns (fwd s, fwd+bwd s, fwd temp bytes, fwd+bwd temp bytes)."""
  args = [jnp.asarray(value, dtype), jnp.asarray(loc), jnp.asarray(attn, dtype)]
  fwd = jax.jit(lambda v, l, a: ms_deform_attn(v, LEVELS, l, a, impl=impl))
  cot = jnp.ones((value.shape[0], loc.shape[1], M * D), dtype)

  def loss(v, l, a):
    return jnp.vdot(ms_deform_attn(v, LEVELS, l, a, impl=impl), cot)
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  mem = [f.lower(*args).compile().memory_analysis().temp_size_in_bytes for f in (fwd, fwd_bwd)]
  t_f = _median_time(lambda: jax.block_until_ready(fwd(*args)), repeats)
  t_fb = _median_time(lambda: jax.block_until_ready(fwd_bwd(*args)), repeats)
  return t_f, t_fb, mem[0], mem[1]


def bench_torch(value, loc, attn, repeats: int):
  v, l, a = (torch.from_numpy(x) for x in (value, loc, attn))

  def fwd():
    with torch.no_grad():
      ms_deform_attn_torch(v, LEVELS, l, a)

  def fwd_bwd():
    leaves = [x.clone().requires_grad_(True) for x in (v, l, a)]
    ms_deform_attn_torch(leaves[0], LEVELS, leaves[1], leaves[2]).sum().backward()
  return _median_time(fwd, repeats), _median_time(fwd_bwd, repeats)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--impls", default=",".join(available_impls()),
                      help="comma-separated JAX impls (default: those available here)")
  parser.add_argument("--batches", default="1,2")
  parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32,bf16")
  parser.add_argument("--image", default="800x1066", help="HxW of the input image")
  parser.add_argument("--no_torch", action="store_true", help="skip the torch CPU column")
  parser.add_argument("--locations", default="uniform", choices=("uniform", "local"),
                      help="uniform: locations uniform over the map, no locality (worst case); "
                           "local: reference point + the official offset pattern + noise, as "
                           "the model samples")
  parser.add_argument("--malloc", default="tuned", choices=_MALLOC_CHOICES,
                      help="tuned: ddetr_jax.host_malloc.tune() as train.py does; default: "
                           "glibc's defaults (both columns share the setting)")
  args = parser.parse_args(argv)
  # Both columns run in this process, so JAX and torch always see the same allocator.
  malloc_tuned = args.malloc == "tuned" and (_MALLOC_TUNED or host_malloc.tune())
  global LEVELS
  LEVELS = image_levels(*(int(x) for x in args.image.split("x")))
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  impls = args.impls.split(",")
  s = sum(h * w for h, w in LEVELS)
  print(f"machine: {platform.machine()} {platform.processor() or ''} {threads} cores, "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); median of {args.repeats}; image {args.image}, "
        f"levels {LEVELS}; glibc malloc "
        f"{'tuned (ddetr_jax.host_malloc)' if malloc_tuned else 'left at its defaults'}; "
        f"sampling locations {args.locations}\n")
  header = ("| shape | B | dtype | pass | impl | JAX ms | torch ms | JAX/torch | JAX temp MB "
            "| floor MB | floor GFLOP | GB/s at floor | temp/floor |")
  print(header)
  print("|---" * (header.count("|") - 1) + "|")
  for name, q in (("encoder", s), ("decoder", 300)):
    for batch in (int(b) for b in args.batches.split(",")):
      value, loc, attn = _inputs(batch, q, locations=args.locations)
      for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        fb_f, fb_fb, fl_f, fl_fb = analytic_floor(batch, q, s, np.dtype(dtype).itemsize)
        if args.no_torch or dtype_name != "fp32":
          t_tf = t_tfb = float("nan")
        else:
          t_tf, t_tfb = bench_torch(value, loc, attn, args.repeats)
        for impl in impls:
          t_f, t_fb, mem_f, mem_fb = bench_jax(impl, value, loc, attn, args.repeats, dtype)
          for pas, t_j, t_t, mem, fb, fl in (("fwd", t_f, t_tf, mem_f, fb_f, fl_f),
                                             ("fwd+bwd", t_fb, t_tfb, mem_fb, fb_fb, fl_fb)):
            torch_cols = "- | -" if math.isnan(t_t) else f"{t_t * 1e3:.1f} | {t_j / t_t:.2f}"
            print(f"| {name} Q={q} | {batch} | {dtype_name} | {pas} | {impl} | {t_j * 1e3:.1f} "
                  f"| {torch_cols} | {mem / 2**20:.0f} | {fb / 2**20:.0f} "
                  f"| {fl / 1e9:.2f} | {fb / t_j / 1e9:.1f} | {mem / fb:.2f} |", flush=True)


if __name__ == "__main__":
  main()
