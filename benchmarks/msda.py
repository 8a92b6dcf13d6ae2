"""Benchmark: multi-scale deformable attention, JAX vs the PyTorch grid_sample formulation.

Shapes are those of an 800x1066 image through ResNet-50 (levels (100,134), (50,67), (25,34),
(13,17); M=8 heads, D=32, L=4, P=4): the encoder (Q = S = 17821) and the decoder (Q = 300), at
batch 1 and 2. Both sides run on the CPU with the same number of threads; times are medians
after warm-up. JAX temporary memory is XLA's compiled `memory_analysis()`; "in+out" is the bytes
of the function's inputs and outputs (for forward+backward: inputs, output and the three input
gradients) for scale.

  python benchmarks/msda.py [--repeats 5] [--impls xla] [--batches 1,2]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddetr_jax.ops.ms_deform_attn import ms_deform_attn  # noqa: E402
from tests.msda_reference import ms_deform_attn_torch  # noqa: E402

LEVELS = ((100, 134), (50, 67), (25, 34), (13, 17))
M, D, P = 8, 32, 4


def _median_time(fn, repeats: int) -> float:
  fn()  # warm-up (and compile)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _inputs(batch: int, q: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in LEVELS)
  value = rng.normal(size=(batch, s, M, D)).astype(np.float32)
  loc = rng.uniform(size=(batch, q, M, len(LEVELS), P, 2)).astype(np.float32)
  attn = rng.uniform(size=(batch, q, M, len(LEVELS), P)).astype(np.float32)
  attn /= attn.sum(axis=(-1, -2), keepdims=True)
  return value, loc, attn


def _nbytes(*arrays) -> int:
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays)


def bench_jax(impl: str, value, loc, attn, repeats: int):
  """Returns (fwd s, fwd+bwd s, fwd temp bytes, fwd+bwd temp bytes)."""
  args = [jnp.asarray(x) for x in (value, loc, attn)]
  fwd = jax.jit(lambda v, l, a: ms_deform_attn(v, LEVELS, l, a, impl=impl))
  cot = jnp.ones((value.shape[0], loc.shape[1], M * D), jnp.float32)

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
  parser.add_argument("--impls", default="xla", help="comma-separated JAX impls")
  parser.add_argument("--batches", default="1,2")
  args = parser.parse_args(argv)
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  impls = args.impls.split(",")
  s = sum(h * w for h, w in LEVELS)
  print(f"machine: {platform.machine()} {platform.processor() or ''} {threads} cores, "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); median of {args.repeats}\n")
  header = ("| shape | B | pass | impl | JAX ms | torch ms | JAX/torch | JAX temp MB "
            "| in+out MB | temp/(in+out) |")
  print(header)
  print("|---" * (header.count("|") - 1) + "|")
  for name, q in (("encoder", s), ("decoder", 300)):
    for batch in (int(b) for b in args.batches.split(",")):
      value, loc, attn = _inputs(batch, q)
      out_bytes = batch * q * M * D * 4
      io_fwd = _nbytes(value, loc, attn) + out_bytes
      io_bwd = io_fwd + _nbytes(value, loc, attn)
      t_tf, t_tfb = bench_torch(value, loc, attn, args.repeats)
      for impl in impls:
        t_f, t_fb, mem_f, mem_fb = bench_jax(impl, value, loc, attn, args.repeats)
        for pas, t_j, t_t, mem, io in (("fwd", t_f, t_tf, mem_f, io_fwd),
                                       ("fwd+bwd", t_fb, t_tfb, mem_fb, io_bwd)):
          print(f"| {name} Q={q} | {batch} | {pas} | {impl} | {t_j * 1e3:.1f} | {t_t * 1e3:.1f} "
                f"| {t_j / t_t:.2f} | {mem / 2**20:.0f} | {io / 2**20:.0f} | {mem / io:.2f} |",
                flush=True)


if __name__ == "__main__":
  main()
