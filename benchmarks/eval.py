"""Benchmark: evaluation throughput (images/s) of the full detector, JAX vs HF transformers.

Both sides run the whole inference of a randomly initialised model of the chosen variant
(ResNet-50, 6+6 layers, 300 queries, 91 classes) on the same images of 800x1333 (shorter side
800, longer side at the 1333 cap: the largest official val size), followed by the official
post-processing (top-100 over queries x classes, xyxy in original pixels): ours is
`postprocess` inside the same jit as the forward; HF's is `DeformableDetrForObjectDetection`
+ `post_process_object_detection`. Same CPU threads for both; both share the process's glibc
malloc, tuned as eval.py tunes it (`ddetr_jax.host_malloc.tune`), and JAX's CPU dispatch is
synchronous as in eval.py (`ddetr_jax.cpu_dispatch`; DDETR_JAX_ASYNC_DISPATCH=1 keeps JAX's
asynchronous default). Times are medians after a warm-up (which includes JAX's compilation,
reported separately). Not part of the test suite.

  python benchmarks/eval.py [--variant default] [--batch 1] [--repeats 3] [--height 800 --width 1333]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.models.deformable_detr.image_processing_pil_deformable_detr import (  # noqa: E402
    DeformableDetrImageProcessorPil)

from configs import deformable_detr  # noqa: E402
from ddetr_jax import cpu_dispatch, host_malloc, xla_gpu_flags  # noqa: E402
from ddetr_jax.models import build_model  # noqa: E402
from ddetr_jax.postprocess import postprocess  # noqa: E402
from tests.test_model_hf_reference import build_hf_model  # noqa: E402


def _median_time(fn, repeats: int) -> tuple[float, float]:
  """(first call seconds, median of `repeats` further calls)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="default", choices=deformable_detr.VARIANTS)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--height", type=int, default=800)
  parser.add_argument("--width", type=int, default=1333)
  parser.add_argument("--skip_hf", action="store_true")
  args = parser.parse_args()
  malloc_tuned = host_malloc.tune()  # as eval.py: before JAX allocates
  sync_dispatch = cpu_dispatch.use_synchronous_cpu_dispatch()  # as eval.py, before JAX's client
  xla_gpu_flags.disable_triton_gemm()  # as eval.py

  config = deformable_detr.get_config(args.variant)
  config.model.dropout = 0.0
  b, h, w = args.batch, args.height, args.width
  rng = np.random.default_rng(0)
  images = rng.normal(size=(b, h, w, 3)).astype(np.float32)  # already "normalised"
  padding_mask = np.zeros((b, h, w), bool)
  orig_size = np.tile(np.array([[h, w]], np.float32), (b, 1))
  num_top = int(config.eval.num_top)
  threads = torch.get_num_threads()
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{threads}, jax {jax.__version__} on {jax.devices()[0].platform}; variant "
        f"{args.variant}, batch {b}, {h}x{w}; JAX CPU dispatch "
        f"{'sync' if sync_dispatch else 'async'}; glibc malloc "
        f"{'tuned' if malloc_tuned else 'left at its defaults'}")

  model = build_model(config)
  t0 = time.perf_counter()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3)),  # the timed size:
                               jnp.zeros((1, h, w), bool))["params"]  # two-stage needs >= Q positions
  jax.block_until_ready(params)
  print(f"jax init: {time.perf_counter() - t0:.1f} s")

  @jax.jit
  def infer(params, images, padding_mask, orig_size):
    outputs = model.apply({"params": params}, images, padding_mask, train=False)
    return postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_size, num_top)

  first, median = _median_time(
      lambda: jax.block_until_ready(infer(params, images, padding_mask, orig_size)), args.repeats)
  print(f"jax  (ours)        first call (compile + run) {first:7.1f} s; median {median:6.2f} s "
        f"per batch = {b / median:.3f} images/s")

  if args.skip_hf:
    return
  hf_model = build_hf_model(config.model)
  processor = DeformableDetrImageProcessorPil()
  pixel_values = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  pixel_mask = torch.ones((b, h, w), dtype=torch.long)
  target_sizes = torch.from_numpy(orig_size).long()

  def hf_infer():
    with torch.no_grad():
      out = hf_model(pixel_values=pixel_values, pixel_mask=pixel_mask)
      return processor.post_process_object_detection(
          types.SimpleNamespace(logits=out.logits, pred_boxes=out.pred_boxes), threshold=0.0,
          target_sizes=target_sizes, top_k=num_top)

  first, median = _median_time(hf_infer, args.repeats)
  print(f"torch (HF 5.x)     first call {first:7.1f} s; median {median:6.2f} s per batch = "
        f"{b / median:.3f} images/s")


if __name__ == "__main__":
  main()
