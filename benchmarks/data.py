"""Input-pipeline throughput per worker (one process, one thread) at COCO-like sizes.

Shapes images are upscaled once to COCO's typical 640 px longer side (decoding is excluded from
every row), then pushed through
  ddetr_jax train   the official train augmentation (flip, multi-scale 480..800 / max 1333 or
                    resize-crop-resize) + normalize + pad into a bucket, boxes included;
  ddetr_jax val     resize to 800 / max 1333 + normalize + pad;
  HF processor      transformers' DeformableDetrImageProcessor (PIL backend) doing resize to
                    800 / max 1333 + rescale + normalize + pad with COCO annotations.
Prints a markdown table of images per second. Usage:
  python benchmarks/data.py [--images 24] [--batch 2]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddetr_jax.data import batching, coco_folder, shapes, transforms  # noqa: E402

_BUCKETS = tuple(range(512, 1345, 128)) + (1344,)


def _coco_sized_records(count: int) -> list[dict]:
  """`count` shapes records upscaled to a 640 px longer side (like COCO's images)."""
  spec = shapes.ShapesSpec(num_train=count, num_val=1, image_size=160, seed=0, min_objects=1,
                           max_objects=4)
  root = shapes.generate(spec, os.path.join(tempfile.mkdtemp(), "shapes"))
  source = coco_folder.CocoFolderSource(os.path.join(root, "annotations", "train.json"),
                                        os.path.join(root, "train"))
  records = []
  for index in range(count):
    record = source[index]
    height, width = record["image"].shape[:2]
    scale = 640 / max(height, width)
    size = (int(width * scale), int(height * scale))
    record["image"] = np.asarray(Image.fromarray(record["image"]).resize(size, Image.BILINEAR))
    record["boxes"] = record["boxes"] * scale
    record["orig_size"] = np.array(record["image"].shape[:2], np.int32)
    records.append(record)
  return records


def _time(fn, records: list[dict], batch: int) -> float:
  """Images per second of fn(list of records) over all records (after one warm-up batch)."""
  fn(records[:batch])
  start = time.perf_counter()
  for i in range(0, len(records), batch):
    fn(records[i:i + batch])
  return len(records) / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=24)
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  import torch  # only for the HF processor; one thread for a per-core comparison.
  torch.set_num_threads(1)
  from transformers.models.deformable_detr.image_processing_pil_deformable_detr import (
      DeformableDetrImageProcessorPil)
  records = _coco_sized_records(args.images)
  rng = np.random.default_rng(0)
  train_kwargs = dict(scales=tuple(range(480, 801, 32)), max_size=1333,
                      crop_resize_scales=(400, 500, 600), crop_min_size=384, crop_max_size=600)

  def ours_train(batch):
    return batching.collate([transforms.train_transform(r, rng, **train_kwargs) for r in batch],
                            _BUCKETS, 100)

  def ours_val(batch):
    return batching.collate([transforms.eval_transform(r, scale=800, max_size=1333)
                             for r in batch], _BUCKETS, 100)

  processor = DeformableDetrImageProcessorPil(size={"shortest_edge": 800, "longest_edge": 1333})

  def hf(batch):
    annotations = [{"image_id": int(r["image_id"]), "annotations": [
        {"bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
         "category_id": int(l), "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0}
        for b, l in zip(r["boxes"], r["labels"])]} for r in batch]
    return processor(images=[r["image"] for r in batch], annotations=annotations,
                     return_tensors="np")

  rows = [("ddetr_jax train augmentation (480-800, max 1333) + pad", _time(ours_train, records,
                                                                          args.batch)),
          ("ddetr_jax val transform (800, max 1333) + pad", _time(ours_val, records, args.batch)),
          ("HF DeformableDetrImageProcessor (800, max 1333) + pad", _time(hf, records,
                                                                         args.batch))]
  print(f"\n{args.images} images of 640 px longer side, batch {args.batch}, 1 process, 1 thread\n")
  print("| pipeline | images/s per worker |")
  print("|---|---|")
  for name, rate in rows:
    print(f"| {name} | {rate:.1f} |")


if __name__ == "__main__":
  main()
