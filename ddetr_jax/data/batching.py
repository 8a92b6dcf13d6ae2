"""Fixed-shape batches: images padded to a bucket shape, boxes padded to `max_boxes`.

A batch (numpy, one process's share) is a dict:
  images        (B, H, W, 3) float32 ImageNet-normalized; padding pixels are 0
  padding_mask  (B, H, W) bool, True = padding
  boxes         (B, max_boxes, 4) float32 normalized cxcywh (relative to `size`, not S)
  labels        (B, max_boxes) int32
  box_mask      (B, max_boxes) bool, True = a real box
  image_id      (B,) int64            host-only
  orig_size     (B, 2) int32 (h, w)   host-only: the source image
  size          (B, 2) int32 (h, w)   host-only: after the transform, before padding
  valid         (B,) bool             host-only: False for filler images
The bucket shape (H, W) comes from the sides in `data.buckets`, by `data.bucket_shape`:
  'square'  H = W = the smallest side that holds every image of the batch: at most len(buckets)
            batch shapes (compilations);
  'rect'    H and W chosen apart, each the smallest side that holds every image's height, resp.
            width: at most len(buckets)**2 shapes, but a landscape COCO image (800x1066 after
            the resize) pads to 896x1152 instead of 1152x1152, 22% fewer pixels, closer to the
            official code, which pads each batch to its largest height and width.
Filler images (valid=False) are all-zero and unpadded
(padding_mask False), so they are numerically harmless, and have no boxes.
"""
import numpy as np

from ddetr_jax import errors
from ddetr_jax.data import transforms

HOST_KEYS = ("image_id", "orig_size", "size", "valid")
BUCKET_SHAPES = ("square", "rect")
DEVICE_KEYS = ("images", "padding_mask", "boxes", "labels", "box_mask")


def check_config(data_config) -> None:
  """Raises errors.InvalidInputError naming the key: data.buckets must be positive whole pixel
  sides, data.bucket_shape one of BUCKET_SHAPES, data.max_boxes a positive count (0 would drop
  every box and train on nothing)."""
  buckets = data_config.buckets
  if (isinstance(buckets, str) or not isinstance(buckets, (tuple, list)) or not buckets
      or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0
                 for b in buckets)):
    raise errors.InvalidInputError(
        f"data.buckets must be a tuple of image sides in pixels (positive integers), e.g. "
        f"(800, 1024, 1344), got {buckets!r}")
  _check_bucket_shape(bucket_shape_of(data_config))
  max_boxes = data_config.max_boxes
  if not isinstance(max_boxes, (int, np.integer)) or isinstance(max_boxes, bool) or max_boxes < 1:
    raise errors.InvalidInputError(f"data.max_boxes must be an integer >= 1, got {max_boxes!r}")


def init_shapes(data_config) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
  """(image shape [1, side, side, 3], padding-mask shape [1, side, side]) at the smallest bucket:
  the inputs a model is initialised (or its parameter shapes traced) with, the smallest batch
  training can feed it. Checks data_config first (`check_config`)."""
  check_config(data_config)
  side = int(min(data_config.buckets))
  return (1, side, side, 3), (1, side, side)


def bucket_shape_of(data_config) -> str:
  """data.bucket_shape, 'square' for a config that predates the key."""
  return data_config.get("bucket_shape", "square")


def _check_bucket_shape(shape: str) -> None:
  """Raises errors.InvalidInputError naming data.bucket_shape unless it is in BUCKET_SHAPES."""
  if shape not in BUCKET_SHAPES:
    raise errors.InvalidInputError(
        f"data.bucket_shape must be one of {BUCKET_SHAPES}, got {shape!r}")


def select_bucket(height: int, width: int, buckets) -> int:
  """Smallest bucket side >= max(height, width)."""
  fitting = [b for b in sorted(buckets) if b >= max(height, width)]
  if not fitting:
    raise errors.InvalidInputError(
        f"an image of size {height}x{width} is larger than the largest bucket {max(buckets)} in "
        f"data.buckets={tuple(buckets)}; add a bucket >= {max(height, width)} (the official "
        f"resize can exceed data.train_max_size/val_max_size by up to half the aspect ratio, in "
        f"pixels)")
  return fitting[0]


def select_bucket_shape(height: int, width: int, buckets, shape: str = "square"
                        ) -> tuple[int, int]:
  """(H, W) of the bucket that holds a height x width image (see the module doc for `shape`)."""
  _check_bucket_shape(shape)
  if shape == "square":
    side = select_bucket(height, width, buckets)
    return side, side
  select_bucket(height, width, buckets)  # the error for an image larger than every bucket.
  return (min(b for b in buckets if b >= height), min(b for b in buckets if b >= width))


def truncate_boxes(boxes: np.ndarray, labels: np.ndarray,
                   max_boxes: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Keeps the `max_boxes` largest boxes (by area, order kept); returns the count dropped."""
  if len(boxes) <= max_boxes:
    return boxes, labels, 0
  area = boxes[:, 2] * boxes[:, 3]
  keep = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
  return boxes[keep], labels[keep], len(boxes) - max_boxes


def filler(size: int) -> dict:
  """A placeholder transformed record (valid=False) for padding a batch."""
  return {"image": np.zeros((size, size, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
          "labels": np.zeros((0,), np.int32), "image_id": np.int64(-1),
          "orig_size": np.array([size, size], np.int32), "size": np.array([size, size], np.int32),
          "valid": False}


def collate(records: list[dict], buckets, max_boxes: int, shape: str = "square") -> dict:
  """Stacks transformed records (see `transforms.train_transform`) into a padded batch, of the
  bucket shape `select_bucket_shape` picks for the batch's largest height and width.

  Returns the batch dict of the module doc plus `num_truncated_boxes` (int): how many boxes
  were dropped because an image had more than `max_boxes`.
  """
  batch_size = len(records)
  height, width = select_bucket_shape(max(r["image"].shape[0] for r in records),
                                      max(r["image"].shape[1] for r in records), buckets, shape)
  images = np.zeros((batch_size, height, width, 3), np.float32)
  padding_mask = np.ones((batch_size, height, width), bool)
  boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
  labels = np.zeros((batch_size, max_boxes), np.int32)
  box_mask = np.zeros((batch_size, max_boxes), bool)
  num_truncated = 0
  for i, record in enumerate(records):
    height, width = record["image"].shape[:2]
    if record.get("valid", True):
      transforms.normalize_image(record["image"], out=images[i, :height, :width])
    padding_mask[i, :height, :width] = False
    kept_boxes, kept_labels, dropped = truncate_boxes(record["boxes"], record["labels"],
                                                      max_boxes)
    num_truncated += dropped
    boxes[i, :len(kept_boxes)] = kept_boxes
    labels[i, :len(kept_labels)] = kept_labels
    box_mask[i, :len(kept_boxes)] = True
  return {
      "images": images, "padding_mask": padding_mask, "boxes": boxes, "labels": labels,
      "box_mask": box_mask,
      "image_id": np.array([r["image_id"] for r in records], np.int64),
      "orig_size": np.stack([np.asarray(r["orig_size"], np.int32) for r in records]),
      "size": np.array([r["image"].shape[:2] for r in records], np.int32).reshape(batch_size, 2),
      "valid": np.array([bool(r.get("valid", True)) for r in records], bool),
      "num_truncated_boxes": num_truncated,
  }


def pad_to_shape(batch: dict, height: int, width: int) -> dict:
  """Pads a collated batch's `images` (zeros) and `padding_mask` (True) to (height, width).

  Boxes are normalised by each image's unpadded size, so nothing else changes. Used when
  several processes must agree on one bucket for a global batch.
  """
  current = batch["images"].shape[1:3]
  if height < current[0] or width < current[1]:
    raise ValueError(f"cannot pad a batch of {current[0]}x{current[1]} down to {height}x{width}")
  if (height, width) == tuple(current):
    return batch
  extra_h, extra_w = height - current[0], width - current[1]
  out = dict(batch)
  out["images"] = np.pad(batch["images"], ((0, 0), (0, extra_h), (0, extra_w), (0, 0)))
  out["padding_mask"] = np.pad(batch["padding_mask"], ((0, 0), (0, extra_h), (0, extra_w)),
                               constant_values=True)
  return out
