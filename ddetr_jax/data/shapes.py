"""A generated detection dataset of coloured shapes, written once in COCO format.

The dataset is a pure function of its parameters (`ShapesSpec`): the same spec gives the same
json and the same image bytes. It is written to `<cache_dir>/shapes-<hash>/` as

  annotations/train.json, annotations/val.json   COCO detection json (bbox xywh, area, iscrowd)
  train/000000.jpg ...,    val/000000.jpg ...     RGB JPEG images

and then read like any other COCO folder (`coco_folder.CocoFolderSource`), so training and
pycocotools evaluation go through the same code as a user's own data.

Images have a textured background (a colour gradient plus uniform pixel noise), 0..max_objects shapes
of `CATEGORIES` in random colours, sizes from small (~8% of the image side) to large (~55%),
random rotation, and overlaps (a new shape may cover at most part of an earlier one).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from ddetr_jax import errors

# COCO-style category ids start at 1.
CATEGORIES = ({"id": 1, "name": "square"}, {"id": 2, "name": "circle"},
              {"id": 3, "name": "triangle"}, {"id": 4, "name": "star"})
_GENERATOR_VERSION = 1   # bump when the drawing code changes, so old caches are not reused.
_MAX_OVERLAP_IOU = 0.4   # a new shape may overlap an earlier one by at most this box IoU.


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
  """Parameters that fully determine a shapes dataset."""
  num_train: int
  num_val: int
  image_size: int   # longer image side in pixels; the shorter one is 75%..100% of it.
  seed: int
  min_objects: int
  max_objects: int

  def validate(self):
    if self.num_train < 1 or self.num_val < 1:
      raise errors.InvalidInputError(f"data.shapes.num_train/num_val must be >= 1, got "
                                     f"{self.num_train}/{self.num_val}")
    if self.image_size < 16:
      raise errors.InvalidInputError(f"data.shapes.image_size must be >= 16, got {self.image_size}")
    if not 0 <= self.min_objects <= self.max_objects:
      raise errors.InvalidInputError("data.shapes needs 0 <= min_objects <= max_objects, got "
                                     f"{self.min_objects}, {self.max_objects}")

  def digest(self) -> str:
    text = json.dumps(dict(dataclasses.asdict(self), version=_GENERATOR_VERSION), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _shape_vertices(kind: str, cx: float, cy: float, radius: float,
                    angle: float) -> np.ndarray:
  """Polygon vertices (K, 2) in (x, y) pixels of a square/triangle/star of circumradius `radius`."""
  if kind == "square":
    t = angle + np.pi / 4 + np.arange(4) * np.pi / 2
    r = np.full(4, radius)
  elif kind == "triangle":
    t = angle + np.arange(3) * 2 * np.pi / 3
    r = np.full(3, radius)
  elif kind == "star":
    t = angle + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
  else:
    raise ValueError(f"no polygon for shape {kind!r}")
  return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)  # [K, 2]


def _polygon_area(vertices: np.ndarray) -> float:
  x, y = vertices[:, 0], vertices[:, 1]
  return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two xyxy boxes (4,)."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / max(union, 1e-9)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Textured background (H, W, 3) uint8: a two-colour linear gradient plus uniform pixel noise."""
  c0 = rng.uniform(0, 255, size=3)
  c1 = rng.uniform(0, 255, size=3)
  theta = rng.uniform(0, 2 * np.pi)
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  ramp = (np.cos(theta) * xs / width + np.sin(theta) * ys / height)  # [H, W]
  ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
  image = (c0 + ramp[..., None] * (c1 - c0)).astype(np.float32)  # [H, W, 3]
  amplitude = int(rng.integers(8, 36))
  image += rng.integers(-amplitude, amplitude + 1, size=(height, width, 3), dtype=np.int16)
  return np.clip(image, 0, 255).astype(np.uint8)


def _draw_image(rng: np.random.Generator, spec: ShapesSpec):
  """One image (H, W, 3) uint8 and its objects [(category_id, xyxy box, area)]."""
  long_side = spec.image_size
  short_side = int(round(long_side * rng.uniform(0.75, 1.0)))
  height, width = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
  image = Image.fromarray(_background(rng, height, width))
  draw = ImageDraw.Draw(image)
  objects = []
  for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
    for _ in range(10):  # a few tries to place it without heavy overlap.
      category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
      # Log-uniform diameter from ~8% to ~55% of the shorter side.
      diameter = min(height, width) * float(np.exp(rng.uniform(np.log(0.08), np.log(0.55))))
      radius = max(diameter / 2, 3.0)
      cx = rng.uniform(radius, width - radius)
      cy = rng.uniform(radius, height - radius)
      if category["name"] == "circle":
        vertices = None
        box = np.array([cx - radius, cy - radius, cx + radius, cy + radius])
        area = float(np.pi * radius ** 2)
      else:
        vertices = _shape_vertices(category["name"], cx, cy, radius, rng.uniform(0, 2 * np.pi))
        box = np.concatenate([vertices.min(0), vertices.max(0)])
        area = _polygon_area(vertices)
      if all(_box_iou(box, other[1]) <= _MAX_OVERLAP_IOU for other in objects):
        break
    else:
      continue
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    if vertices is None:
      draw.ellipse([float(v) for v in box], fill=colour)
    else:
      draw.polygon([(float(x), float(y)) for x, y in vertices], fill=colour)
    box = np.clip(box, 0, [width, height, width, height])
    objects.append((category["id"], box, area))
  return np.asarray(image), objects


def _write_split(directory: str, split: str, count: int, spec: ShapesSpec, seed_offset: int):
  os.makedirs(os.path.join(directory, split))
  images, annotations = [], []
  for index in range(count):
    rng = np.random.default_rng([spec.seed, seed_offset, index])
    pixels, objects = _draw_image(rng, spec)
    file_name = f"{index:06d}.jpg"
    Image.fromarray(pixels).save(os.path.join(directory, split, file_name), quality=92)
    image_id = index + 1
    images.append({"id": image_id, "file_name": file_name,
                   "height": int(pixels.shape[0]), "width": int(pixels.shape[1])})
    for category_id, box, area in objects:
      x0, y0, x1, y1 = (round(float(v), 2) for v in box)
      annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": category_id, "bbox": [x0, y0, round(x1 - x0, 2),
                                                               round(y1 - y0, 2)],
                          "area": round(area, 2), "iscrowd": 0})
  ann = {"info": {"description": f"ddetr_jax shapes {split}", "spec": dataclasses.asdict(spec)},
         "images": images, "annotations": annotations, "categories": list(CATEGORIES)}
  with open(os.path.join(directory, "annotations", f"{split}.json"), "w") as f:
    json.dump(ann, f)


def generate(spec: ShapesSpec, directory: str) -> str:
  """Writes the dataset for `spec` into the new directory `directory` (must not exist)."""
  spec.validate()
  os.makedirs(os.path.join(directory, "annotations"))
  _write_split(directory, "train", spec.num_train, spec, seed_offset=0)
  _write_split(directory, "val", spec.num_val, spec, seed_offset=1)
  return directory


def spec_from_config(data_config) -> ShapesSpec:
  s = data_config.shapes
  return ShapesSpec(num_train=int(s.num_train), num_val=int(s.num_val),
                    image_size=int(s.image_size), seed=int(s.seed),
                    min_objects=int(s.min_objects), max_objects=int(s.max_objects))


def dataset_dir(data_config) -> str:
  """Directory of the shapes dataset for `data_config`; generates it there on first use.

  `data.cache_dir` (default `~/.cache/ddetr_jax`) holds one `shapes-<hash>` directory per spec.
  Generation writes to a temporary directory and renames it, so concurrent processes never see
  a half-written dataset.
  """
  spec = spec_from_config(data_config)
  spec.validate()
  cache_dir = os.path.expanduser(data_config.cache_dir or "~/.cache/ddetr_jax")
  target = os.path.join(cache_dir, f"shapes-{spec.digest()}")
  if os.path.isfile(os.path.join(target, "annotations", "val.json")):
    return target
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".shapes-tmp-", dir=cache_dir)
  try:
    generate(spec, os.path.join(tmp, "data"))
    try:
      os.rename(os.path.join(tmp, "data"), target)
    except OSError:
      if not os.path.isfile(os.path.join(target, "annotations", "val.json")):
        raise  # not a lost race with another process: a real error.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target
