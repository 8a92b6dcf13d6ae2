"""A random-access source over a COCO-format folder: one annotation json plus an image directory.

Record (dict) returned by `CocoFolderSource[i]`:
  image        (H, W, 3) uint8 RGB
  boxes        (N, 4) float32 xyxy in absolute pixels of `image`
  labels       (N,) int32, category ids mapped per `category_ids` ('raw' or 'contiguous')
  is_crowd     (N,) bool
  image_id     int64 (the json's image id)
  orig_size    (2,) int32 (h, w)
  file_name    str, the image path (for error messages)

Annotations with a non-finite or negative-size bbox, or a box entirely outside its image, are
dropped when the json is loaded and counted in `num_dropped_annotations` (logged once).
"""
import contextlib
import io
import json
import logging
import os

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from ddetr_jax import errors
from ddetr_jax.data.errors import CorruptImageError

_REQUIRED_KEYS = ("images", "annotations", "categories")


def load_annotation_json(ann_file: str) -> dict:
  """Loads and checks a COCO detection json; errors name the file and the offending entry."""
  if not os.path.isfile(ann_file):
    raise errors.MissingInputError(f"COCO annotation file not found: {ann_file!r}")

  def malformed(detail: str) -> errors.InvalidInputError:
    return errors.InvalidInputError(f"malformed COCO annotation json {ann_file!r}: {detail}")

  try:
    with open(ann_file) as f:
      dataset = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise malformed(str(e)) from e
  if not isinstance(dataset, dict):
    raise malformed(f"top level is {type(dataset).__name__}, expected an object")
  for key in _REQUIRED_KEYS:
    if not isinstance(dataset.get(key), list):
      raise malformed(f"missing list {key!r}")
  for i, image in enumerate(dataset["images"]):
    for key in ("id", "file_name"):
      if not isinstance(image, dict) or key not in image:
        raise malformed(f"images[{i}] has no {key!r}: {str(image)[:200]}")
  for i, category in enumerate(dataset["categories"]):
    if not isinstance(category, dict) or not isinstance(category.get("id"), int):
      raise malformed(f"categories[{i}] has no integer 'id': {str(category)[:200]}")
  index_of_id = {}  # per list: id -> index of its entry (a repeated id would silently drop one)
  for what in ("images", "categories"):
    first = index_of_id[what] = {}
    for i, entry in enumerate(dataset[what]):
      if entry["id"] in first:
        raise malformed(f"{what}[{first[entry['id']]}] and {what}[{i}] have the same id "
                        f"{entry['id']!r}")
      first[entry["id"]] = i
  image_ids, category_ids = index_of_id["images"], index_of_id["categories"]
  for i, ann in enumerate(dataset["annotations"]):
    where = f"annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else None})"
    if not isinstance(ann, dict):
      raise malformed(f"{where} is not an object")
    for key in ("image_id", "category_id", "bbox"):
      if key not in ann:
        raise malformed(f"{where} has no {key!r}")
    bbox = ann["bbox"]
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
        or not all(isinstance(v, (int, float)) or v is None for v in bbox)):
      raise malformed(f"{where} bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    if ann["image_id"] not in image_ids:
      raise malformed(f"{where} refers to image_id {ann['image_id']} which is not in 'images'")
    if ann["category_id"] not in category_ids:
      raise malformed(f"{where} has category_id {ann['category_id']} which is not in "
                      f"'categories'")
  return dataset


def _box_is_usable(ann: dict, image: dict) -> bool:
  """False for non-finite or negative-size boxes and boxes entirely outside the image."""
  x, y, w, h = (float("nan") if v is None else float(v) for v in ann["bbox"])
  if not all(np.isfinite([x, y, w, h])) or w < 0 or h < 0:
    return False
  width, height = image.get("width"), image.get("height")
  if width is not None and height is not None:
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
      return False
  return True


def category_label_map(category_ids: list[int], mode: str) -> dict[int, int]:
  """Dataset category id -> label id. 'raw' keeps ids; 'contiguous' numbers them 0..K-1 sorted."""
  if mode == "raw":
    return {c: c for c in category_ids}
  if mode == "contiguous":
    return {c: i for i, c in enumerate(sorted(category_ids))}
  raise errors.InvalidInputError(f"data.category_ids must be 'raw' or 'contiguous', got {mode!r}")


def indexed_coco(dataset: dict) -> COCO:
  """A pycocotools COCO over a COCO-format dict, indexed without pycocotools' prints."""
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):  # "creating index... index created!"
    coco.createIndex()
  return coco


def load_coco(ann_file: str) -> COCO:
  """A pycocotools COCO over the checked json (category ids are the dataset's)."""
  return indexed_coco(load_annotation_json(ann_file))


class CocoFolderSource:
  """Random-access detection records from a COCO json and an image directory (see module doc)."""

  def __init__(self, ann_file: str, image_dir: str, category_ids: str = "raw"):
    self.ann_file = ann_file
    self.image_dir = image_dir
    if not os.path.isdir(image_dir):
      raise errors.MissingInputError(f"image directory not found: {image_dir!r} (for "
                                     f"{ann_file!r})")
    self.coco = load_coco(ann_file)
    categories = sorted(self.coco.cats.values(), key=lambda c: c["id"])
    self.category_to_label = category_label_map([c["id"] for c in categories], category_ids)
    self.label_to_category = {v: k for k, v in self.category_to_label.items()}
    self.label_names = {self.category_to_label[c["id"]]: str(c.get("name", c["id"]))
                        for c in categories}
    self.image_ids = sorted(self.coco.imgs)
    self.num_dropped_annotations = 0
    self._targets = {}
    for image_id in self.image_ids:
      image = self.coco.imgs[image_id]
      anns = [a for a in self.coco.imgToAnns.get(image_id, [])]
      usable = [a for a in anns if _box_is_usable(a, image)]
      self.num_dropped_annotations += len(anns) - len(usable)
      boxes = np.array([a["bbox"] for a in usable], np.float32).reshape(-1, 4)
      boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
      labels = np.array([self.category_to_label[a["category_id"]] for a in usable],
                        np.int32).reshape(-1)
      is_crowd = np.array([bool(a.get("iscrowd", 0)) for a in usable], bool).reshape(-1)
      self._targets[image_id] = (boxes, labels, is_crowd)
    if self.num_dropped_annotations:
      logging.warning("%s: dropped %d annotations with a non-finite, negative-size or "
                      "out-of-image bbox", ann_file, self.num_dropped_annotations)

  def check_image_files(self) -> None:
    """Raises errors.MissingInputError naming the image files of the json absent from image_dir.

    The loaders call it when they start (`loader.check_image_files`; one directory listing per
    folder the json's file names are in, not a stat per image), so a missing file is reported
    then rather than when its record is first read, which in a long run can be hours later.
    Reading only the annotations (category names, the ground truth) does not need the images.
    """
    listed = {}  # folder -> names of the regular files in it (empty if it does not exist).

    def files_in(folder: str) -> set:
      if folder not in listed:
        try:
          with os.scandir(folder) as entries:
            listed[folder] = {e.name for e in entries if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
          listed[folder] = set()
      return listed[folder]

    missing = []
    for image_id in self.image_ids:
      name = self.coco.imgs[image_id]["file_name"]
      folder, base = os.path.split(os.path.join(self.image_dir, name))
      if base not in files_in(folder) and not os.path.isfile(os.path.join(folder, base)):
        missing.append(name)  # (the isfile catches what a listing names differently: links)
    if missing:
      raise errors.MissingInputError(
          f"{len(missing)} of the {len(self.image_ids)} image files that {self.ann_file!r} names "
          f"are not in the image directory {self.image_dir!r}: {missing[:5]}"
          + (" ..." if len(missing) > 5 else ""))

  @property
  def max_label(self) -> int:
    return max(self.label_to_category, default=-1)

  def __len__(self) -> int:
    return len(self.image_ids)

  def __getitem__(self, index: int) -> dict:
    image_id = self.image_ids[index]
    info = self.coco.imgs[image_id]
    path = os.path.join(self.image_dir, info["file_name"])
    if not os.path.isfile(path):
      raise errors.MissingInputError(f"image file {path!r} of record {index} (image_id "
                                     f"{image_id}) in {self.ann_file!r} does not exist")
    try:
      with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types for truncated or corrupt files.
      raise CorruptImageError(f"cannot decode image {path!r} of record {index} "
                              f"(image_id {image_id}): {e}") from e
    boxes, labels, is_crowd = self._targets[image_id]
    return {"image": image, "boxes": boxes.copy(), "labels": labels.copy(),
            "is_crowd": is_crowd.copy(), "image_id": np.int64(image_id),
            "orig_size": np.array(image.shape[:2], np.int32), "file_name": path}
