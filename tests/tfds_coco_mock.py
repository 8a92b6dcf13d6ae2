"""A mocked TFDS `coco/2017` for tests: hand-written examples behind `tfds.testing.mock_data`.

The examples are stored serialized with the real coco/2017 features and decoded the way TFDS's
array_record data source decodes them (`deserialize_example_np` with the caller's decoders), so
`SkipDecoding` yields the encoded JPEG bytes and `objects` comes back as lists, as on real data.

  with tfds_coco_mock.mock_coco():            # validation split = VALIDATION (6 images)
    source = data.build_source(config.data, "val")

`VALIDATION` covers: images of different sizes and aspect ratios, non-contiguous image ids in
shuffled record order (as TFDS stores them), labels 0, 11 and 79 (COCO ids 1, 13 and 90, on
both sides of COCO's unused ids), a crowd box and an image without objects. `EXPECTED_GT` is
its COCO ground truth, worked out by hand: [x, y, w, h] in original pixels and COCO ids.
"""
import contextlib
import os
import tempfile
from typing import Optional, Sequence

import numpy as np


def _example(image_id: int, height: int, width: int, objects: Sequence[tuple]) -> dict:
  """A decoded coco/2017 example; objects are (ymin, xmin, ymax, xmax normalized, label, crowd)."""
  rng = np.random.default_rng(image_id)
  return {"image": rng.integers(0, 255, (height, width, 3), dtype=np.uint8),
          "image/id": image_id, "image/filename": f"{image_id:012d}.jpg",
          "objects": [{"bbox": np.array(box, np.float32), "label": label, "is_crowd": crowd,
                       "area": int(round((box[2] - box[0]) * height * (box[3] - box[1]) * width)),
                       "id": 1000 * image_id + k}
                      for k, (*box, label, crowd) in enumerate(objects)]}


# (image_id, height, width, objects): TFDS record order is not image id order.
VALIDATION = [
    _example(285, 48, 64, [(0.25, 0.125, 0.75, 0.5, 0, False)]),
    _example(139, 80, 40, [(0.1, 0.2, 0.6, 0.9, 11, False), (0.5, 0.0, 1.0, 0.5, 79, False)]),
    _example(632, 64, 64, []),
    _example(724, 60, 90, [(0.0, 0.0, 1.0, 1.0, 0, True), (0.2, 0.4, 0.8, 0.6, 79, False)]),
    _example(776, 40, 80, [(0.25, 0.25, 0.75, 0.75, 11, False)]),
    _example(1000, 100, 50, [(0.3, 0.2, 0.7, 0.6, 0, False), (0.1, 0.5, 0.4, 0.9, 0, False)]),
]

# image_id -> (height, width, [(COCO category id, [x, y, w, h] pixels, iscrowd)]).
EXPECTED_GT = {
    285: (48, 64, [(1, [8.0, 12.0, 24.0, 24.0], 0)]),
    139: (80, 40, [(13, [8.0, 8.0, 28.0, 40.0], 0), (90, [0.0, 40.0, 20.0, 40.0], 0)]),
    632: (64, 64, []),
    724: (60, 90, [(1, [0.0, 0.0, 90.0, 60.0], 1), (90, [36.0, 12.0, 18.0, 36.0], 0)]),
    776: (40, 80, [(13, [20.0, 10.0, 40.0, 20.0], 0)]),
    1000: (100, 50, [(1, [10.0, 30.0, 20.0, 40.0], 0), (1, [25.0, 10.0, 20.0, 30.0], 0)]),
}


class _SerializedSource:
  """A list of serialized examples decoded on access, like TFDS's ArrayRecordDataSource."""

  def __init__(self, features, examples: Sequence[dict], decoders=None):
    self._features, self._decoders = features, decoders
    self._records = [features.serialize_example(features.encode_example(e)) for e in examples]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return self._features.deserialize_example_np(self._records[index], decoders=self._decoders)


@contextlib.contextmanager
def mock_coco(validation: Optional[Sequence[dict]] = None, train: Optional[Sequence[dict]] = None):
  """Mocks `tfds.data_source('coco/2017', ...)`: 'validation' and 'train' serve the examples.

  Args:
    validation: decoded examples of the validation split (default `VALIDATION`).
    train: those of the train split (default: the validation examples).
  """
  from ddetr_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  tfds = tfds_source._import_tfds()  # pylint: disable=protected-access
  validation = VALIDATION if validation is None else validation
  splits = {"validation": validation, "train": validation if train is None else train}

  def as_data_source(builder, split, decoders=None, **kwargs):
    del kwargs
    if split not in splits:
      raise ValueError(f"mocked {builder.name} has no split {split!r}")
    return _SerializedSource(builder.info.features, splits[split], decoders)

  # Under mock_data no dataset_info.json exists, so every tfds.builder() reads the dataset info
  # "from the GCS bucket" into a fresh tempfile.mkdtemp() that TFDS never removes; those empty
  # folders go to a temporary folder of ours, removed on exit.
  with tempfile.TemporaryDirectory(prefix="tfds_coco_mock_") as scratch, \
      _tempdir(scratch), tfds.testing.mock_data(as_data_source_fn=as_data_source):
    yield


@contextlib.contextmanager
def _tempdir(path: str):
  """tempfile's default folder is `path` inside the block, in this process and in the processes
  it starts there (TMPDIR: the loader's worker processes build sources too)."""
  saved, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
  tempfile.tempdir = os.environ["TMPDIR"] = path
  try:
    yield
  finally:
    tempfile.tempdir = saved
    if saved_env is None:
      os.environ.pop("TMPDIR", None)
    else:
      os.environ["TMPDIR"] = saved_env
