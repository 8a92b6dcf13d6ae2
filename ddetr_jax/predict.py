"""Detections on arbitrary image files: annotated pictures and a detections json.

`predict_files(model, params, config, patterns, out_dir)` reads every file matching the patterns
(any size; grayscale, palette, CMYK, 16-bit and RGBA images are converted to RGB, transparency
composited on white), resizes it like validation images (shorter side `data.val_scale`, longer
at most `data.val_max_size`), pads it to its bucket shape (`data.bucket_shape`: the smallest
`data.buckets` side holding both sides, or each side on its own; a side the official resize
rule leaves 1 pixel longer than the largest bucket, e.g. 129 px for `val_max_size` 128, is
padded to a multiple of 64 instead, at the cost of one more compilation),
runs the detector one image at a time, and writes into `out_dir`
  <stem>.jpg              the image with boxes, class names and scores > threshold
  <stem>_attention.png    (the `num_attention` best detections) the last decoder layer's
                          sampling points on every level, coloured by attention weight
                          (`_attention1.png`, ... for the next ones)
  detections.json         {'images': [{'file', 'height', 'width', 'output': jpg, 'detections':
                          [{'label', 'name', 'score', 'query', 'box_xyxy'}], 'attention': [png]}],
                          'skipped': [{'file', 'error'}]}
No file written replaces an input file or any other file already in `out_dir` (compared by
resolved path and by inode), except the outputs of an earlier run that its detections.json
lists, so `out_dir` may be the input directory and a rerun replaces its own pictures: an image
whose names are taken (by such a file, or by the outputs of an earlier image of the same stem)
is written as <stem>_pred.jpg, <stem>_pred_attention.png, then <stem>_pred2..., and
detections.json as detections_pred.json, ... when that name is taken.
An unreadable file is logged by name, listed under 'skipped', and the others still run; when no
matched file can be read, `errors.InvalidInputError` names the patterns.
"""
import glob
import itertools
import json
import logging
import os
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from ddetr_jax import errors
from ddetr_jax import visualize
from ddetr_jax.data import batching
from ddetr_jax.data import transforms
from ddetr_jax.postprocess import postprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
# The stride of the model's coarsest level (the extra stride-2 convolution on the backbone's
# stride-32 output when num_feature_levels=4): an input side that is a multiple of it makes every
# level's padding mask an exact downsample of the input mask, as the configs' buckets (multiples
# of 64) do. Used for the padded side of an image larger than the largest bucket.
SIZE_DIVISIBILITY = 64


class UnreadableImageError(ValueError):
  """An image file that cannot be opened or decoded (the message names the file)."""


def load_image(path: str) -> np.ndarray:
  """[H, W, 3] uint8 RGB of any PIL-readable image; raises UnreadableImageError naming `path`."""
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
      elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, np.float64)
        top = pixels.max() if pixels.size and pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8))
      pixels = np.asarray(image.convert("RGB"), np.uint8)
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    raise UnreadableImageError(f"cannot read image {path!r}: {e}") from e
  if pixels.ndim != 3 or min(pixels.shape[:2]) < 1:
    raise UnreadableImageError(f"cannot read image {path!r}: empty image of shape {pixels.shape}")
  return pixels


def _oversize_sides(height: int, width: int, buckets: Sequence[int]) -> tuple[int, ...]:
  """The sides of (height, width) that no bucket holds, each rounded up to a multiple of
  SIZE_DIVISIBILITY (the official resize rule can leave the longer side 1 pixel above
  `max_size`, e.g. 1000x333 -> 43x129 for max_size 128): extra sides for this one image."""
  largest = max(buckets)
  return tuple(sorted({-(-d // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
                       for d in (height, width) if d > largest}))


def padded_shape(height: int, width: int, buckets: Sequence[int], shape: str = "square"
                 ) -> tuple[int, int]:
  """(H, W) of the input an (height, width) resized image is padded to: the bucket shape
  `batching.select_bucket_shape` gives (`shape`: data.bucket_shape), with a side no bucket holds
  rounded up to a multiple of SIZE_DIVISIBILITY instead."""
  return batching.select_bucket_shape(
      height, width, tuple(buckets) + _oversize_sides(height, width, buckets), shape)


def image_batch(image: np.ndarray, config) -> dict:
  """A one-image batch (see ddetr_jax/data/batching.py) resized like validation images.

  image: [H, W, 3] uint8. The batch's `images` are [1, H, W, 3] with (H, W) from `padded_shape`:
  a data bucket shape, or for an image that fits none a larger one (one more compiled shape).
  """
  record = {"image": image, "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros((0,), np.int32), "is_crowd": np.zeros((0,), bool),
            "area": np.zeros((0,), np.float32), "image_id": np.int64(0),
            "orig_size": np.array(image.shape[:2], np.int32)}
  record = transforms.eval_transform(record, scale=config.data.val_scale,
                                     max_size=config.data.val_max_size)
  buckets = tuple(config.data.buckets)
  extra = _oversize_sides(*record["image"].shape[:2], buckets)  # as `padded_shape`
  batch = batching.collate([record], buckets + extra, int(config.data.max_boxes),
                           batching.bucket_shape_of(config.data))
  batch.pop("num_truncated_boxes", None)
  return batch


def expand_patterns(patterns: Sequence[str]) -> list[str]:
  """Files matching glob patterns (a directory means its image files; `~` is expanded), sorted,
  no duplicates."""
  files = []
  for pattern in map(os.path.expanduser, patterns):
    if os.path.isdir(pattern):
      matches = [os.path.join(pattern, n) for n in sorted(os.listdir(pattern))
                 if n.lower().endswith(IMAGE_EXTENSIONS)]
    else:
      matches = sorted(glob.glob(pattern, recursive=True)) or (
          [pattern] if not glob.has_magic(pattern) else [])
    files.extend(m for m in matches if m not in files)
  return files


def validation_images(config, count: int, export_dir: Optional[str] = None) -> list[str]:
  """Paths of the first `count` validation images of `config.data`.

  coco_folder/shapes: the image files, by image id. tfds (no files): the first `count` records
  of `data.val_split` in the split's order, their encoded images written unchanged to
  `export_dir` as <file_name> (or <image_id>.jpg); `export_dir` is required there.
  """
  from ddetr_jax.data import coco_folder, sources  # pylint: disable=g-import-not-at-top
  if config.data.source == "tfds":
    if not export_dir:
      raise ValueError("validation images of data.source='tfds' are read from TFDS records and "
                       "need an export_dir to be written to")
    return _export_tfds_images(config.data, count, export_dir)
  if config.data.source not in ("coco_folder", "shapes"):
    raise errors.InvalidInputError(f"validation images need data.source 'tfds', 'coco_folder' or "
                                   f"'shapes', got {config.data.source!r}; pass image files "
                                   f"instead")
  ann_file, image_dir = sources.coco_paths(config.data, "val")
  images = sorted(coco_folder.load_coco(ann_file).imgs.values(), key=lambda image: image["id"])
  return [os.path.join(image_dir, image["file_name"]) for image in images[:count]]


def _export_tfds_images(data_config, count: int, export_dir: str) -> list[str]:
  """Writes the encoded images of the first `count` TFDS validation records; their paths."""
  from ddetr_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.tfds_split_source(data_config, "val", decode_images=False)
  os.makedirs(export_dir, exist_ok=True)
  paths = []
  for index in range(min(count, len(source))):
    record = source[index]
    name = os.path.basename(record["file_name"]) or f"{int(record['image_id'])}.jpg"
    path = os.path.join(export_dir, name)
    with open(path, "wb") as f:
      f.write(bytes(record["image"]))
    paths.append(path)
  return paths


def _class_names(config) -> list[str]:
  try:
    from ddetr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    return list(data_lib.category_names(config.data))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("no class names (the dataset of config.data is not available: %s); "
                    "labels are drawn as numbers", e)
    return [str(i) for i in range(config.model.num_classes)]


class Predictor:
  """Jitted detection (and optionally deformable sampling) of one preprocessed image at a time."""

  def __init__(self, model, params, config, with_sampling: bool = False):
    num_top = int(config.eval.num_top)
    self.with_sampling = with_sampling

    def run(params, images, padding_mask, orig_size):
      if with_sampling:
        outputs = visualize.last_decoder_sampling(model, params, images, padding_mask)
      else:
        outputs = model.apply({"params": params}, images, padding_mask, train=False)
      detections = postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_size, num_top)
      if with_sampling:
        detections["sampling_locations"] = outputs["sampling_locations"]
        detections["attention_weights"] = outputs["attention_weights"]
      return detections

    self._run = jax.jit(run)
    self.params = params

  def __call__(self, batch: dict) -> dict:
    """Post-processed detections (numpy) of a batch from `image_batch`."""
    out = self._run(self.params, batch["images"], batch["padding_mask"],
                    np.asarray(batch["orig_size"], np.float32))
    return jax.tree.map(np.asarray, out)


def _file_keys(path: str) -> set:
  """What identifies the file `path` names: its resolved real path and, when it exists, its
  (device, inode), so that symlinks, hard links and case-insensitive names all match."""
  keys = {os.path.normcase(os.path.realpath(path))}
  try:
    stat = os.stat(path)
    keys.add((stat.st_dev, stat.st_ino))
  except OSError:
    pass
  return keys


def _previous_outputs(out_dir: str) -> set:
  """Keys (`_file_keys`) of the files an earlier prediction run wrote into `out_dir`, as its
  detections.json lists them (the json included), so that a new run may replace them."""
  json_path = os.path.join(out_dir, "detections.json")
  try:
    with open(json_path) as f:
      previous = json.load(f)
  except (OSError, ValueError):
    return set()
  if not (isinstance(previous, dict) and isinstance(previous.get("images"), list)
          and "skipped" in previous):
    return set()  # a detections.json this module did not write: the user's.
  keys = _file_keys(json_path)
  for entry in previous["images"]:
    if isinstance(entry, dict):
      for path in [entry.get("output")] + list(entry.get("attention") or []):
        if isinstance(path, str):
          keys |= _file_keys(path)
  return keys


class _OutputNames:
  """Free output paths in `out_dir`: never an input file, never a file already in `out_dir`
  other than an earlier run's outputs (`_previous_outputs`), never a path already given out."""

  def __init__(self, out_dir: str, inputs: Sequence[str]):
    self.out_dir = out_dir
    self.taken = set()
    for path in inputs:
      self.taken |= _file_keys(path)
    if os.path.isdir(out_dir):
      replaceable = _previous_outputs(out_dir)
      for name in os.listdir(out_dir):
        keys = _file_keys(os.path.join(out_dir, name))
        if not keys & replaceable:
          self.taken |= keys

  def _variants(self, stem: str):
    """stem, stem_pred, stem_pred2, stem_pred3, ..."""
    yield stem
    for k in itertools.count(1):
      yield f"{stem}_pred" + ("" if k == 1 else str(k))

  def claim(self, stem: str, suffixes: Sequence[str]) -> tuple[str, list[str]]:
    """The first stem variant whose out_dir/<variant><suffix> are all free, and those paths
    (reserved from now on)."""
    for variant in self._variants(stem):
      paths = [os.path.join(self.out_dir, variant + suffix) for suffix in suffixes]
      keys = [_file_keys(path) for path in paths]
      if not any(k & self.taken for k in keys):
        for k in keys:
          self.taken |= k
        return variant, paths
    raise AssertionError("unreachable")

  def written(self, path: str) -> None:
    """Records a file just written (now with an inode, so an alias of it is taken too)."""
    self.taken |= _file_keys(path)


def predict_files(model, params, config, patterns: Sequence[str], out_dir: str,
                  threshold: Optional[float] = None, num_attention: int = 1,
                  class_names: Optional[Sequence[str]] = None) -> dict:
  """Detects objects in image files and writes the pictures and detections.json (module doc).

  Args:
    model, params: the detector and its params.
    config: full config (uses data.val_scale, data.val_max_size, data.buckets, data.max_boxes,
      eval.num_top, eval.score_threshold, model.num_classes).
    patterns: files, directories or glob patterns.
    out_dir: output directory (created); may hold the inputs, which are never replaced.
    threshold: score threshold (default config.eval.score_threshold).
    num_attention: sampling-point pictures per image, for its best detections (0: none).
    class_names: names per label id (default: those of config.data's dataset, else numbers).
  Returns:
    the detections.json content.
  Raises:
    errors.MissingInputError: no file matches the patterns.
    errors.InvalidInputError: files match but none of them can be read as an image.
  """
  threshold = float(config.eval.score_threshold if threshold is None else threshold)
  names = list(class_names) if class_names is not None else _class_names(config)
  files = expand_patterns(patterns)
  if not files:
    raise errors.MissingInputError(f"no image files match {list(patterns)}")
  predictor = Predictor(model, params, config, with_sampling=num_attention > 0)
  outputs = _OutputNames(out_dir, files)
  suffixes = [".jpg"] + [f"_attention{'' if rank == 0 else rank}.png"
                         for rank in range(num_attention)]
  buckets = tuple(config.data.buckets)
  summary = {"images": [], "skipped": []}
  for path in files:
    try:
      image = load_image(path)
    except UnreadableImageError as e:
      logging.error("%s; skipped", e)
      summary["skipped"].append({"file": path, "error": str(e)})
      continue
    batch = image_batch(image, config)
    height, width = batch["images"].shape[1:3]
    if height not in buckets or width not in buckets:
      logging.warning("%s: resized to %dx%d, larger than the largest bucket %d of data.buckets; "
                      "padded to %dx%d (one more compilation)", path, *batch["size"][0],
                      max(buckets), height, width)
    out = predictor(batch)
    keep = np.flatnonzero(out["scores"][0] > threshold)
    detections = [{"label": int(out["labels"][0, k]),
                   "name": (names[int(out["labels"][0, k])]
                            if int(out["labels"][0, k]) < len(names) else str(out["labels"][0, k])),
                   "score": float(out["scores"][0, k]), "query": int(out["query"][0, k]),
                   "box_xyxy": [float(v) for v in out["boxes"][0, k]]} for k in keep]
    stem = os.path.splitext(os.path.basename(path))[0]
    new_stem, (picture_path, *attention_paths) = outputs.claim(stem, suffixes)
    if new_stem != stem:
      logging.warning("%s: writing its pictures as %s: %s (or its sampling-point pictures) "
                      "would replace an input file or another image's pictures", path,
                      picture_path, os.path.join(out_dir, f"{stem}.jpg"))
    picture = visualize.draw_detections(image, out["boxes"][0], out["labels"][0], out["scores"][0],
                                        names, threshold)
    os.makedirs(out_dir, exist_ok=True)
    picture.save(picture_path, quality=92)
    outputs.written(picture_path)
    entry = {"file": path, "height": int(image.shape[0]), "width": int(image.shape[1]),
             "output": picture_path, "detections": detections}
    for rank in range(min(num_attention, len(keep) if len(keep) else 1)):
      query = int(out["query"][0, rank])
      label = int(out["labels"][0, rank])
      attention_path = attention_paths[rank]
      name = names[label] if label < len(names) else str(label)
      visualize.plot_sampling_points(
          image, out["sampling_locations"][0, query], out["attention_weights"][0, query],
          padded_size=batch["images"].shape[1:3], size=batch["size"][0], path=attention_path,
          box=out["boxes"][0, rank],
          title=f"{os.path.basename(path)}: {name} {float(out['scores'][0, rank]):.2f} "
                f"(query {query}), last decoder layer sampling points")
      outputs.written(attention_path)
      entry.setdefault("attention", []).append(attention_path)
    summary["images"].append(entry)
  if not summary["images"]:
    raise errors.InvalidInputError(
        f"none of the files matching {list(patterns)} could be read as an image "
        f"({len(files)} skipped, first: {summary['skipped'][0]['error']}); pass image files or "
        f"a directory of images")
  _, (json_path,) = outputs.claim("detections", [".json"])
  if os.path.basename(json_path) != "detections.json":
    logging.warning("%s is an input file; the detections are written to %s",
                    os.path.join(out_dir, "detections.json"), json_path)
  with open(json_path, "w") as f:
    json.dump(summary, f, indent=1)
  logging.info("wrote %d annotated images to %s (%d skipped)", len(summary["images"]), out_dir,
               len(summary["skipped"]))
  return summary
