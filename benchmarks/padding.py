"""Padding of COCO-sized training batches: square buckets, rectangular buckets, official.

  python benchmarks/padding.py [--batches 2000] [--batch 2,4] [--forward]

Images of COCO's typical sizes (a 640 px longer side: 640x480, 640x427, 640x426, 640x424,
landscape or portrait) go through the official train resize (shorter side one of 480..800 step
32, longer side at most 1333; the resize-crop-resize branch with probability 0.5) in batches,
and each batch is padded three ways:
  square   ddetr_jax with data.bucket_shape='square': H = W = the smallest bucket side holding
           every image of the batch;
  rect     ddetr_jax with data.bucket_shape='rect' (the COCO config's default): H and W each the
           smallest bucket side holding the batch's largest height, resp. width;
  official the official code: the batch's largest height and width, no buckets (a new shape
           almost every batch: fine for PyTorch, a compilation per shape under jit).
Buckets are the COCO config's (512..1280 step 128, and 1344). Prints, per batch size and
landscape share, the padded pixels per image pixel and the number of distinct batch shapes.
Landscape shares are inputs of the benchmark, not measured on COCO (no COCO on this machine).
With --forward, also times the default model's forward (batch 1, after compilation) at the
square and rectangular bucket of an 800x1066 image, on JAX's default device.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import deformable_detr  # noqa: E402
from ddetr_jax.data import batching, transforms  # noqa: E402

_SIZES = ((480, 640), (427, 640), (426, 640), (424, 640))  # (h, w) landscape; portrait = (w, h)


def _train_size(rng: np.random.Generator, height: int, width: int, data) -> tuple[int, int]:
  """(h, w) after the official train resize (and crop) of a height x width image."""
  if rng.random() >= data.crop_prob:
    return transforms.resized_size(height, width, int(rng.choice(data.train_scales)),
                                   data.train_max_size)
  h, w = transforms.resized_size(height, width, int(rng.choice(data.crop_resize_scales)), None)
  crop_h = int(rng.integers(data.crop_min_size, min(h, data.crop_max_size) + 1))
  crop_w = int(rng.integers(data.crop_min_size, min(w, data.crop_max_size) + 1))
  return transforms.resized_size(crop_h, crop_w, int(rng.choice(data.train_scales)),
                                 data.train_max_size)


def padding_table(batches: int, batch_size: int, landscape: float, seed: int = 0) -> dict:
  """{policy: (padded pixels / image pixels, distinct batch shapes)} over `batches` batches."""
  data = deformable_detr.get_config().data
  buckets = tuple(data.buckets)
  rng = np.random.default_rng(seed)
  image_pixels = 0
  padded = {"square": 0, "rect": 0, "official": 0}
  shapes = {name: set() for name in padded}
  for _ in range(batches):
    sizes = []
    for _ in range(batch_size):
      h, w = _SIZES[rng.integers(len(_SIZES))]
      if rng.random() >= landscape:
        h, w = w, h
      sizes.append(_train_size(rng, h, w, data))
    image_pixels += sum(h * w for h, w in sizes)
    max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
    for name, shape in (("square", batching.select_bucket_shape(max_h, max_w, buckets, "square")),
                        ("rect", batching.select_bucket_shape(max_h, max_w, buckets, "rect")),
                        ("official", (max_h, max_w))):
      padded[name] += batch_size * shape[0] * shape[1]
      shapes[name].add(shape)
  return {name: (padded[name] / image_pixels, len(shapes[name])) for name in padded}


def forward_seconds(height: int, width: int, repeats: int = 3) -> float:
  """Median seconds of the default model's forward at batch 1, height x width, after compiling."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = deformable_detr.get_config()
  model = build_model(config)
  images, mask = jnp.zeros((1, height, width, 3)), jnp.zeros((1, height, width), bool)
  mask = mask.at[:, 800:].set(True).at[:, :, 1066:].set(True)  # an 800x1066 image inside
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images, mask)
  forward = jax.jit(lambda p, x, m: model.apply(p, x, m, train=False)["pred_boxes"])
  jax.block_until_ready(forward(params, images, mask))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(forward(params, images, mask))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=2000)
  parser.add_argument("--batch", default="2,4", help="images per batch (per device / per host)")
  parser.add_argument("--forward", action="store_true")
  args = parser.parse_args()
  from ddetr_jax import xla_gpu_flags  # pylint: disable=g-import-not-at-top
  xla_gpu_flags.disable_triton_gemm()  # as eval.py, before --forward's first computation
  print("| images per batch | landscape share | square: padded px / image px (shapes) | "
        "rect | official (batch max) |")
  print("|---|---|---|---|---|")
  for batch_size in (int(b) for b in args.batch.split(",")):
    for landscape in (1.0, 0.75, 0.5):
      table = padding_table(args.batches, batch_size, landscape)
      cells = [f"{ratio:.2f} ({count})" for ratio, count in
               (table["square"], table["rect"], table["official"])]
      print(f"| {batch_size} | {landscape:.2f} | " + " | ".join(cells) + " |")
  if args.forward:
    buckets = tuple(deformable_detr.get_config().data.buckets)
    square = batching.select_bucket_shape(800, 1066, buckets, "square")
    rect = batching.select_bucket_shape(800, 1066, buckets, "rect")
    seconds = {shape: forward_seconds(*shape) for shape in (square, rect)}
    print()
    print("| default model forward, batch 1, an 800x1066 image padded to | s |")
    print("|---|---|")
    for shape, s in seconds.items():
      print(f"| {shape[0]}x{shape[1]} | {s:.3f} |")
    print()
    print(f"rect / square: {seconds[rect] / seconds[square]:.2f}")


if __name__ == "__main__":
  main()
