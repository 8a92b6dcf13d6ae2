"""Choosing a source from `config.data`, its class names, and its pycocotools ground truth.

`data.source` is one of
  tfds         TFDS `data.tfds_name` (coco/2017), splits `data.train_split` / `data.val_split`.
  coco_folder  `data.{train,val}_ann_file` + `data.{train,val}_image_dir`.
  shapes       the generated dataset (`shapes.py`), cached under `data.cache_dir`.
Splits are named 'train' and 'val' ('validation' is accepted for 'val').
"""
import dataclasses
import functools
import os

import numpy as np
from pycocotools.coco import COCO

from ddetr_jax import errors
from ddetr_jax.data import coco_folder
from ddetr_jax.data import shapes

SOURCES = ("tfds", "coco_folder", "shapes")


def _split_key(split: str) -> str:
  if split in ("val", "validation"):
    return "val"
  if split == "train":
    return "train"
  raise ValueError(f"unknown split {split!r}; expected 'train' or 'val'")


def coco_paths(data_config, split: str) -> tuple[str, str]:
  """(annotation json, image directory) of a coco_folder or shapes split."""
  key = _split_key(split)
  if data_config.source == "shapes":
    root = shapes.dataset_dir(data_config)
    return os.path.join(root, "annotations", f"{key}.json"), os.path.join(root, key)
  ann_file = data_config.get(f"{key}_ann_file")
  image_dir = data_config.get(f"{key}_image_dir")
  if not ann_file or not image_dir:
    raise errors.InvalidInputError(f"data.source='coco_folder' needs data.{key}_ann_file and "
                                   f"data.{key}_image_dir, got {ann_file!r} and {image_dir!r}")
  return ann_file, image_dir


@functools.lru_cache(maxsize=8)
def _coco_folder_source(ann_file: str, image_dir: str, category_ids: str):
  return coco_folder.CocoFolderSource(ann_file, image_dir, category_ids)


def tfds_split_source(data_config, split: str, decode_images: bool = True):
  """The TfdsSource of split 'train' or 'val' (`data.train_split` / `data.val_split`)."""
  from ddetr_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  tfds_split = data_config.train_split if _split_key(split) == "train" else data_config.val_split
  return tfds_source.TfdsSource(data_config.tfds_name, tfds_split, data_config.tfds_data_dir,
                                data_config.category_ids, decode_images=decode_images)


def build_source(data_config, split: str, num_classes: int | None = None):
  """A random-access source (len, getitem -> record dict; see coco_folder.py for the keys).

  Args:
    data_config: `config.data`.
    split: 'train' or 'val'.
    num_classes: if given, every label must be < num_classes (the model's class count);
      otherwise a ValueError names the category id and the annotation file.
  """
  if data_config.source in ("coco_folder", "shapes"):
    ann_file, image_dir = coco_paths(data_config, split)
    source = _coco_folder_source(ann_file, image_dir, data_config.category_ids)
    where = repr(ann_file)
  elif data_config.source == "tfds":
    source = tfds_split_source(data_config, split)
    where = f"TFDS {data_config.tfds_name!r}"
  else:
    raise errors.InvalidInputError(f"unknown data.source {data_config.source!r}; expected one of "
                                   f"{SOURCES}")
  if len(source) == 0:
    raise errors.InvalidInputError(f"the {split} split of {where} holds no images (data.source="
                                   f"{data_config.source!r})")
  if num_classes is not None and source.max_label >= num_classes:
    category = source.label_to_category[source.max_label]
    raise errors.InvalidInputError(
        f"category id {category} of {where} becomes label {source.max_label}, which needs "
        f"model.num_classes > {source.max_label} but it is {num_classes} (data.category_ids="
        f"{data_config.category_ids!r}; 'contiguous' numbers the categories 0..K-1)")
  return source


@dataclasses.dataclass(frozen=True)
class Categories:
  """Class names by label id and the label -> dataset category id map (for COCO results)."""
  names: tuple[str, ...]                 # names[label]; 'N/A' for unused label ids.
  label_to_category_id: dict[int, int]

  def category_ids(self, labels: np.ndarray) -> np.ndarray:
    """Dataset category ids (COCO results json) of label ids, any shape."""
    table = np.full(len(self.names), -1, np.int64)
    for label, category in self.label_to_category_id.items():
      table[label] = category
    return table[np.asarray(labels)]


def categories(data_config) -> Categories:
  """The categories of `data_config`'s validation split."""
  source = build_source(data_config, "val")
  names = ["N/A"] * (source.max_label + 1)
  for label, name in source.label_names.items():
    names[label] = name
  return Categories(tuple(names), dict(source.label_to_category))


def category_names(data_config) -> list[str]:
  """Class names indexed by label id ('N/A' for label ids no category maps to)."""
  return list(categories(data_config).names)


def coco_ground_truth(data_config, split: str = "val") -> COCO:
  """pycocotools COCO of a split; its category ids are the dataset's (see `Categories`).

  tfds: built from the records (one pass, images not decoded): every record's image id and
  decoded size, its boxes as [x, y, w, h] in original pixels, TFDS labels mapped to COCO's
  category ids (`tfds_source.COCO_CATEGORY_IDS`, whatever data.category_ids), crowd flags, and
  TFDS's `area` (COCO's area truncated to an integer, used for the small/medium/large ranges).
  """
  if data_config.source in ("coco_folder", "shapes"):
    ann_file, _ = coco_paths(data_config, split)
    return coco_folder.load_coco(ann_file)
  if data_config.source != "tfds":
    raise errors.InvalidInputError(f"unknown data.source {data_config.source!r}; expected one of "
                                   f"{SOURCES}")
  source = tfds_split_source(data_config, split, decode_images=False)
  images, annotations = [], []
  for index in range(len(source)):
    record = source[index]
    height, width = (int(v) for v in record["orig_size"])
    images.append({"id": int(record["image_id"]), "height": height, "width": width})
    for box, label, crowd, area in zip(record["boxes"], record["labels"], record["is_crowd"],
                                       record["area"]):
      x0, y0, x1, y1 = (float(v) for v in box)
      annotations.append({"id": len(annotations) + 1, "image_id": int(record["image_id"]),
                          "category_id": int(source.label_to_category[int(label)]),
                          "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area),
                          "iscrowd": int(crowd)})
  return coco_folder.indexed_coco({
      "images": images, "annotations": annotations,
      "categories": [{"id": c, "name": source.label_names[l]}
                     for l, c in sorted(source.label_to_category.items())]})
