"""DETR's data augmentation in numpy/PIL (the official `datasets/transforms.py` behaviour).

Transforms act on a PIL image and an (N, 4) float32 xyxy box array in absolute pixels; labels
travel alongside as an (N,) array so that dropping a box drops its label. Randomness comes only
from the `np.random.Generator` passed in, so a record's augmentation is a function of its seed.

Train (`train_transform`): horizontal flip with probability 0.5, then
  (a) resize the shorter side to one of `scales` (longer side <= `max_size`), or, with
      probability `crop_prob` (official: 0.5),
  (b) resize the shorter side to one of `crop_resize_scales`, random crop of side lengths in
      [crop_min_size, crop_max_size], then (a).
Val (`eval_transform`): resize the shorter side to `val_scale` (longer side <= `val_max_size`).
Both first drop crowd boxes and clip boxes to the image, dropping empty ones.
"""
import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def resized_size(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
  """(h, w) with the shorter side `size` and the longer side at most `max_size` (official rule).

  When the longer side would exceed `max_size`, the shorter side becomes
  round(max_size * short / long); the other side is then int(size * long / short).
  """
  if max_size is not None:
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
      size = int(round(max_size * short / long))
  if (width <= height and width == size) or (height <= width and height == size):
    return height, width
  if width < height:
    return int(size * height / width), size
  return size, int(size * width / height)


def resize(image: Image.Image, boxes: np.ndarray, size: int,
           max_size: int | None) -> tuple[Image.Image, np.ndarray]:
  """Bilinear resize to `resized_size`; boxes (N, 4) xyxy scaled by the per-axis ratios."""
  new_h, new_w = resized_size(image.height, image.width, size, max_size)
  if (new_h, new_w) == (image.height, image.width):
    return image, boxes
  ratio = np.array([new_w / image.width, new_h / image.height] * 2, np.float32)
  return image.resize((new_w, new_h), Image.BILINEAR), boxes * ratio


def hflip(image: Image.Image, boxes: np.ndarray) -> tuple[Image.Image, np.ndarray]:
  """Mirror left-right; a box [x0, y0, x1, y1] becomes [W - x1, y0, W - x0, y1]."""
  width = image.width
  flipped = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
  return image.transpose(Image.FLIP_LEFT_RIGHT), flipped.astype(np.float32)


def clip_and_filter(boxes: np.ndarray, labels: np.ndarray, height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
  """Clip boxes (N, 4) xyxy to [0, W] x [0, H] and drop those left with no area."""
  boxes = np.clip(boxes, 0, np.array([width, height, width, height], np.float32))
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return boxes[keep], labels[keep]


def crop(image: Image.Image, boxes: np.ndarray, labels: np.ndarray, top: int, left: int,
         height: int, width: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
  """Crop the window (top, left, height, width); boxes shift, clip to it, and empty ones drop."""
  cropped = image.crop((left, top, left + width, top + height))
  boxes = boxes - np.array([left, top, left, top], np.float32)
  boxes, labels = clip_and_filter(boxes, labels, height, width)
  return cropped, boxes, labels


def random_size_crop(image: Image.Image, boxes: np.ndarray, labels: np.ndarray,
                     min_size: int, max_size: int, rng: np.random.Generator):
  """Crop a window of random size in [min_size, min(side, max_size)] at a random position."""
  width = int(rng.integers(min(min_size, image.width), min(image.width, max_size) + 1))
  height = int(rng.integers(min(min_size, image.height), min(image.height, max_size) + 1))
  top = int(rng.integers(0, image.height - height + 1))
  left = int(rng.integers(0, image.width - width + 1))
  return crop(image, boxes, labels, top, left, height, width)


def prepare_targets(record: dict) -> tuple[np.ndarray, np.ndarray]:
  """Boxes (N, 4) xyxy and labels (N,) of a source record, crowd boxes dropped, clipped."""
  boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
  labels = np.asarray(record["labels"], np.int32).reshape(-1)
  is_crowd = np.asarray(record.get("is_crowd", np.zeros(len(labels), bool)), bool).reshape(-1)
  height, width = record["image"].shape[:2]
  return clip_and_filter(boxes[~is_crowd], labels[~is_crowd], height, width)


def normalized_cxcywh(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """xyxy absolute (N, 4) -> cxcywh (N, 4) divided by the image (w, h, w, h)."""
  cxcy = (boxes[:, :2] + boxes[:, 2:]) / 2
  wh = boxes[:, 2:] - boxes[:, :2]
  return (np.concatenate([cxcy, wh], axis=1)
          / np.array([width, height, width, height], np.float32)).astype(np.float32)


def normalize_image(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (H, W, 3) ImageNet-normalized, written into `out` if given."""
  scale = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
  offset = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
  if out is None:
    out = np.empty(image.shape, np.float32)
  np.multiply(image, scale, out=out, casting="unsafe")
  out += offset
  return out


def _finish(image: Image.Image, boxes: np.ndarray, labels: np.ndarray, record: dict) -> dict:
  """Output of a transform: uint8 image and normalized cxcywh boxes (see `train_transform`)."""
  pixels = np.asarray(image, np.uint8)
  height, width = pixels.shape[:2]
  return {"image": pixels, "boxes": normalized_cxcywh(boxes, height, width),
          "labels": labels.astype(np.int32), "image_id": np.int64(record["image_id"]),
          "orig_size": np.asarray(record["orig_size"], np.int32),
          "size": np.array([height, width], np.int32)}


def train_transform(record: dict, rng: np.random.Generator, *, scales, max_size: int,
                    crop_resize_scales, crop_min_size: int, crop_max_size: int,
                    crop_prob: float = 0.5) -> dict:
  """The official train augmentation of one source record.

  Returns a dict: image (h, w, 3) uint8 after augmentation (not yet normalized), boxes (N, 4)
  float32 normalized cxcywh, labels (N,) int32, image_id, orig_size (2,), size (2,) = (h, w).
  """
  boxes, labels = prepare_targets(record)
  image = Image.fromarray(record["image"])
  if rng.random() < 0.5:
    image, boxes = hflip(image, boxes)
  if rng.random() < 1.0 - crop_prob:  # official RandomSelect: branch (a) when random() < p.
    image, boxes = resize(image, boxes, int(rng.choice(scales)), max_size)
  else:
    image, boxes = resize(image, boxes, int(rng.choice(crop_resize_scales)), None)
    image, boxes, labels = random_size_crop(image, boxes, labels, crop_min_size, crop_max_size,
                                            rng)
    image, boxes = resize(image, boxes, int(rng.choice(scales)), max_size)
  return _finish(image, boxes, labels, record)


def eval_transform(record: dict, *, scale: int, max_size: int) -> dict:
  """Validation transform: resize only. Same output keys as `train_transform`."""
  boxes, labels = prepare_targets(record)
  image, boxes = resize(Image.fromarray(record["image"]), boxes, scale, max_size)
  return _finish(image, boxes, labels, record)
