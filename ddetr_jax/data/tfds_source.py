"""A random-access source over TFDS `coco/2017` (array_record) through `tfds.data_source`.

Records have the same keys as `coco_folder.CocoFolderSource` (image, boxes xyxy absolute,
labels, is_crowd, image_id, orig_size, file_name). TFDS stores COCO's 80 classes as contiguous
labels 0..79; `category_ids='raw'` maps them back to COCO's 91-slot ids (`COCO_CATEGORY_IDS`) so
that the official weights line up, 'contiguous' keeps 0..79.

TensorFlow is imported lazily and hidden from every GPU/TPU (it only builds the TFDS dataset info).
Nothing is ever downloaded: a data dir without the prepared dataset raises FileNotFoundError naming
the dataset and the data dir.
"""
import os

import numpy as np

from ddetr_jax import errors
from ddetr_jax.data.errors import CorruptImageError

# COCO 2017 category ids of TFDS labels 0..79 (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54,
    55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81,
    82, 84, 85, 86, 87, 88, 89, 90)


def _import_tfds():
  """Imports tensorflow_datasets with TensorFlow kept off accelerators."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    pass  # already initialised, or no such device type.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


class TfdsSource:
  """Random-access COCO records from a TFDS array_record data source."""

  def __init__(self, name: str, split: str, data_dir: str = "", category_ids: str = "raw",
               decode_images: bool = True):
    tfds = _import_tfds()
    self.name, self.split = name, split
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    builder = tfds.builder(name, data_dir=data_dir or None)
    try:
      # download=False: a missing dataset must not start a download of COCO (~25 GB) here.
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      decoders=decoders, download=False)
    except Exception as e:  # pylint: disable=broad-except  (tfds's error varies with the state)
      if builder.is_prepared():
        raise
      raise errors.MissingInputError(
          f"TFDS dataset {name!r} is not prepared in data dir {str(builder.data_dir_root)!r} (no "
          f"{builder.data_dir}/dataset_info.json; data.tfds_data_dir={data_dir!r}). Build it "
          f"with `tfds build {name} --data_dir=DIR --file_format=array_record`, "
          f"or point data.tfds_data_dir at a directory holding it") from e
    self.decode_images = decode_images
    label_feature = builder.info.features["objects"]["label"]
    names = list(label_feature.names)
    if name.startswith("coco") and len(names) == len(COCO_CATEGORY_IDS):
      dataset_ids = list(COCO_CATEGORY_IDS)
    else:
      dataset_ids = list(range(1, len(names) + 1))
    if category_ids == "raw":
      self.label_to_category = {c: c for c in dataset_ids}
      self._label_of_tfds = np.array(dataset_ids, np.int32)
    elif category_ids == "contiguous":
      self.label_to_category = dict(enumerate(dataset_ids))
      self._label_of_tfds = np.arange(len(dataset_ids), dtype=np.int32)
    else:
      raise errors.InvalidInputError(f"data.category_ids must be 'raw' or 'contiguous', got "
                                     f"{category_ids!r}")
    self.label_names = {int(self._label_of_tfds[i]): n for i, n in enumerate(names)}

  @property
  def max_label(self) -> int:
    return int(self._label_of_tfds.max(initial=-1))

  def __len__(self) -> int:
    return len(self._source)

  def _where(self, index: int, example: dict) -> str:
    return (f"record {index} (image_id {int(example.get('image/id', -1))}) of TFDS "
            f"{self.name!r} split {self.split!r}")

  def __getitem__(self, index: int) -> dict:
    try:
      example = self._source[index]
    except Exception as e:  # decoding happens inside the data source.
      raise CorruptImageError(f"cannot read record {index} of TFDS {self.name!r} split "
                              f"{self.split!r}: {e}") from e
    objects = example["objects"]
    bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)  # [N, 4] (ymin, xmin, ymax, xmax)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    is_crowd = np.asarray(objects["is_crowd"], bool).reshape(-1)
    if not len(bbox) == len(labels) == len(is_crowd):
      raise ValueError(f"malformed {self._where(index, example)}: {len(bbox)} boxes, "
                       f"{len(labels)} labels, {len(is_crowd)} is_crowd flags")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(self._label_of_tfds)):
      raise ValueError(f"malformed {self._where(index, example)}: label {labels.max()} outside "
                       f"0..{len(self._label_of_tfds) - 1}")
    image = example["image"]
    if self.decode_images:
      image = np.asarray(image, np.uint8)
      height, width = image.shape[:2]
    else:
      import io  # pylint: disable=g-import-not-at-top
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(io.BytesIO(image)) as im:
        width, height = im.size
    keep = np.isfinite(bbox).all(axis=1)
    boxes = bbox[keep][:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float32)
    return {"image": image, "boxes": boxes.astype(np.float32),
            "labels": self._label_of_tfds[labels[keep]], "is_crowd": is_crowd[keep],
            "area": np.asarray(objects.get("area", np.zeros(len(bbox))), np.float32)[keep],
            "image_id": np.int64(example["image/id"]),
            "orig_size": np.array([height, width], np.int32),
            "file_name": _text(example.get("image/filename", "")),
            "num_dropped_annotations": int((~keep).sum())}
