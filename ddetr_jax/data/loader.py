"""Train and eval iterators: grain pipelines from a source to (sharded) fixed-shape batches.

Train order. One global stream per seed: epoch e is a permutation of the dataset (grain
`shuffle` + `repeat`, reseeded each epoch), and the augmentation of stream position k is seeded
by (seed, k). JAX process p of P takes positions p, p + P, p + 2P, ... so processes read disjoint
records and together consume the stream in order. With `data.num_workers` > 0, grain worker
processes each build whole batches from an interleaved slice of the process's positions; output
is deterministic for a fixed (seed, process count, num_workers), and the iterator state
(`get_state`/`set_state`, a JSON-serialisable dict) restores the exact following batches.

Bad images. A record whose image cannot be decoded (`CorruptImageError`) is skipped in training
(the batch is filled from the next records) and replaced by a `valid=False` filler in evaluation;
both are counted in `iterator.stats` and logged. With `data.strict` it raises instead. A missing
image file always raises, naming the file: a COCO folder's files are checked when the train
iterator or the eval batches are made, and one removed later raises when its record is read.
"""
import functools
import logging
import math
from typing import Any, Iterator

import grain
import jax
from absl import flags
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddetr_jax import errors
from ddetr_jax import sharding
from ddetr_jax.data import batching
from ddetr_jax.data import main_guard
from ddetr_jax.data import sources
from ddetr_jax.data import transforms
from ddetr_jax.data.errors import CorruptImageError

_STAT_KEYS = ("num_skipped", "num_truncated_boxes")
# Record-stage read-ahead: 2 threads, 8 records (grain's default, 500 decoded images, is too much).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _check_image_files(source) -> None:
  """A source that reads image files from a folder checks they are all there before loading."""
  check = getattr(source, "check_image_files", None)
  if check is not None:
    check()


def check_image_files(config, split: str) -> None:
  """Raises errors.MissingInputError if an image file of `split`'s records is missing (a COCO
  folder's json naming a file its image folder lacks); other sources have nothing to check.
  The trainer calls it for 'val' at start, long before the first evaluation reads the images."""
  _check_image_files(sources.build_source(config.data, split, num_classes=_num_classes(config)))


def _load(source, index: int, strict: bool) -> dict:
  """source[index], or a skip marker {'skipped': True, 'error': str} for a corrupt image."""
  try:
    return source[index]
  except CorruptImageError as e:
    if strict:
      raise
    return {"skipped": True, "error": str(e)}


class _TrainRecord:
  """Stream position -> transformed record, or a skip marker (see `_load`)."""

  def __init__(self, source, data_config):
    self.source = source
    self.strict = bool(data_config.strict)
    self.kwargs = dict(scales=tuple(data_config.train_scales),
                       max_size=data_config.train_max_size,
                       crop_resize_scales=tuple(data_config.crop_resize_scales),
                       crop_min_size=data_config.crop_min_size,
                       crop_max_size=data_config.crop_max_size,
                       crop_prob=float(data_config.get("crop_prob", 0.5)))

  def __call__(self, index: int, rng: np.random.Generator) -> dict:
    record = _load(self.source, int(index), self.strict)
    if record.get("skipped"):
      return record
    return transforms.train_transform(record, rng, **self.kwargs)


class _SkipAndBatchIterDataset(grain.IterDataset):
  """Batches `batch_size` records with `batching.collate`, dropping (and counting) skip markers."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, buckets, max_boxes: int,
               bucket_shape: str):
    super().__init__(parent)
    self.batch_size, self.buckets, self.max_boxes = batch_size, tuple(buckets), max_boxes
    self.bucket_shape = bucket_shape

  def __iter__(self):
    return _SkipAndBatchIterator(self._parent.__iter__(), self.batch_size, self.buckets,
                                 self.max_boxes, self.bucket_shape)


class _SkipAndBatchIterator(grain.DatasetIterator):

  def __init__(self, parent, batch_size: int, buckets, max_boxes: int, bucket_shape: str):
    super().__init__(parent)
    self.batch_size, self.buckets, self.max_boxes = batch_size, buckets, max_boxes
    self.bucket_shape = bucket_shape

  def __next__(self) -> dict:
    records, errors = [], []
    while len(records) < self.batch_size:
      record = next(self._parent)
      if record.get("skipped"):
        errors.append(record["error"])
        if len(errors) > 100 * self.batch_size:
          # The loop visits the split again and again: count the images, not the attempts.
          raise CorruptImageError(
              f"no training image could be decoded in {len(errors)} reads in a row "
              f"({len(set(errors))} different images failed), e.g. {errors[-1]}; check the "
              f"image folder the config names")
      else:
        records.append(record)
    batch = batching.collate(records, self.buckets, self.max_boxes, self.bucket_shape)
    batch["skipped_errors"] = errors
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()  # records are never buffered across batches.

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def _multiprocess_prefetch(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """`dataset` run in `num_workers` grain worker processes."""
  main_guard.check_main_is_guarded(f"data.num_workers={num_workers}")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags; outside an absl app use defaults.
  return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def _process_seed(seed: int, salt: int) -> int:
  return int(np.random.SeedSequence([seed, salt]).generate_state(1)[0])


def _local_batch_size(global_batch_size: int, what: str) -> int:
  count = jax.process_count()
  if global_batch_size % count:
    raise errors.InvalidInputError(f"{what}={global_batch_size} is not divisible by the number "
                                   f"of JAX processes {count}")
  return global_batch_size // count


class _Globalize:
  """Turns a numpy batch into global jax arrays on `mesh` (device keys only).

  With several processes, each collates its own images and may pick a smaller bucket than
  another; the processes agree on the largest height and the largest width (a tiny host
  all-gather) and pad up to them, so the global batch has one shape.
  """

  def __init__(self, mesh: Mesh | None):
    self.sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec("data"))

  def __call__(self, batch: dict) -> dict:
    if self.sharding is None:
      return batch
    if jax.process_count() > 1:
      shapes = multihost_utils.process_allgather(np.array(batch["images"].shape[1:3], np.int32))
      height, width = np.max(np.asarray(shapes).reshape(-1, 2), axis=0)
      batch = batching.pad_to_shape(batch, int(height), int(width))
    out = dict(batch)
    for key in batching.DEVICE_KEYS:
      out[key] = jax.make_array_from_process_local_data(self.sharding, batch[key])
    return out


def _pop_stats(batch: dict, stats: dict) -> dict:
  """Moves the batch's bookkeeping (skipped images, truncated boxes) into `stats` and logs it."""
  for error in batch.pop("skipped_errors"):
    stats["num_skipped"] += 1
    logging.warning("skipped an undecodable image (%d so far): %s", stats["num_skipped"], error)
  truncated = int(batch.pop("num_truncated_boxes"))
  if truncated:
    stats["num_truncated_boxes"] += truncated
    logging.warning("dropped %d boxes beyond data.max_boxes (%d so far)", truncated,
                    stats["num_truncated_boxes"])
  # Plain arrays: grain's shared-memory buffers are released now, not at interpreter exit.
  return {key: np.array(value) if isinstance(value, np.ndarray) and type(value) is not np.ndarray
          else value for key, value in batch.items()}


class TrainIterator(Iterator[dict]):
  """Infinite iterator of training batches (see batching.py for the dict) with exact resume.

  Attributes:
    stats: counts so far: num_skipped (corrupt images), num_truncated_boxes (beyond max_boxes).
  """

  def __init__(self, dataset: grain.IterDataset, mesh: Mesh | None):
    self._iterator = iter(dataset)
    self._globalize = _Globalize(mesh)
    self.stats = {key: 0 for key in _STAT_KEYS}

  def __next__(self) -> dict:
    return self._globalize(_pop_stats(next(self._iterator), self.stats))

  def get_state(self) -> dict[str, Any]:
    """The position after the last returned batch (JSON-serialisable)."""
    return self._iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state)

  def close(self):
    """Stops grain's worker processes (if any)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def _num_classes(config) -> int | None:
  model = config.get("model")
  return None if model is None else model.get("num_classes")


def make_train_iterator(config, mesh: Mesh | None = None,
                        start_state: dict[str, Any] | None = None) -> TrainIterator:
  """Training batches of `config.train.global_batch_size` images (this process's share).

  Args:
    config: full config (uses config.data, config.train.global_batch_size,
      config.model.num_classes).
    mesh: if given, device fields become global arrays sharded along its 'data' axis.
    start_state: a `TrainIterator.get_state()` to resume from.
  """
  data = config.data
  source = sources.build_source(data, "train", num_classes=_num_classes(config))
  _check_image_files(source)
  global_batch = int(config.train.global_batch_size)
  local_batch = _local_batch_size(global_batch, "train.global_batch_size")
  if mesh is not None:
    sharding.check_batch_divisible(global_batch, mesh, "train.global_batch_size")
  if len(source) == 0:
    raise errors.InvalidInputError("the training split is empty")
  seed = int(data.seed)
  ds = grain.MapDataset.range(len(source))
  ds = ds.shuffle(seed=_process_seed(seed, 0)).repeat(None)
  ds = ds.random_map(_TrainRecord(source, data), seed=_process_seed(seed, 1))
  ds = ds[jax.process_index()::jax.process_count()]
  it_ds = _SkipAndBatchIterDataset(ds.to_iter_dataset(_READ_OPTIONS), local_batch, data.buckets,
                                   int(data.max_boxes), batching.bucket_shape_of(data))
  if data.num_workers > 0:
    it_ds = _multiprocess_prefetch(it_ds, int(data.num_workers))
  iterator = TrainIterator(it_ds, mesh)
  if start_state is not None:
    iterator.set_state(start_state)
  return iterator


class _EvalRecord:
  """Process-local position -> transformed record, or a valid=False filler past the end."""

  def __init__(self, source, data_config, process_index: int, process_count: int):
    self.source = source
    self.strict = bool(data_config.strict)
    self.scale, self.max_size = data_config.val_scale, data_config.val_max_size
    self.filler_size = min(data_config.buckets)
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, position: int) -> dict:
    index = self.process_index + int(position) * self.process_count
    if index >= len(self.source):
      return batching.filler(self.filler_size)
    record = _load(self.source, index, self.strict)
    if record.get("skipped"):
      return dict(batching.filler(self.filler_size), **record)
    return transforms.eval_transform(record, scale=self.scale, max_size=self.max_size)


def _collate_eval(records: list[dict], buckets, max_boxes: int, bucket_shape: str) -> dict:
  batch = batching.collate(records, buckets, max_boxes, bucket_shape)
  batch["skipped_errors"] = [r["error"] for r in records if r.get("skipped")]
  return batch


class EvalBatches:
  """Every record of a split exactly once, in batches of `config.eval.batch_size` (global).

  Process p gets records p, p + P, ...; each process yields the same number of batches
  (`len(self)`), the last ones filled with `valid=False` fillers. Re-iterable.

  Attributes:
    num_records: records in the split (all processes).
    stats: counts from the last pass: num_skipped, num_truncated_boxes.
    first_error: the message of this process's first undecodable image in the last pass, or None.
  """

  def __init__(self, config, split: str, mesh: Mesh | None):
    data = config.data
    self.source = sources.build_source(data, split, num_classes=_num_classes(config))
    _check_image_files(self.source)
    self.num_records = len(self.source)
    global_batch = int(config.eval.batch_size)
    local_batch = _local_batch_size(global_batch, "eval.batch_size")
    if mesh is not None:
      sharding.check_batch_divisible(global_batch, mesh, "eval.batch_size")
    per_process = math.ceil(self.num_records / jax.process_count())
    self._num_batches = max(1, math.ceil(per_process / local_batch))
    ds = grain.MapDataset.range(self._num_batches * local_batch)
    ds = ds.map(_EvalRecord(self.source, data, jax.process_index(), jax.process_count()))
    ds = ds.batch(local_batch, batch_fn=functools.partial(
        _collate_eval, buckets=tuple(data.buckets), max_boxes=int(data.max_boxes),
        bucket_shape=batching.bucket_shape_of(data)))
    self._dataset = ds.to_iter_dataset(_READ_OPTIONS)
    if data.num_workers > 0:
      self._dataset = _multiprocess_prefetch(self._dataset, int(data.num_workers))
    self._globalize = _Globalize(mesh)
    self.stats = {key: 0 for key in _STAT_KEYS}
    self.first_error = None

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict]:
    self.stats = {key: 0 for key in _STAT_KEYS}
    self.first_error = None
    iterator = iter(self._dataset)
    try:
      for batch in iterator:
        if self.first_error is None and batch["skipped_errors"]:
          self.first_error = batch["skipped_errors"][0]
        yield self._globalize(_pop_stats(batch, self.stats))
    finally:
      close = getattr(iterator, "close", None)
      if close is not None:
        close()  # stops grain's worker processes.


def make_eval_batches(config, split: str = "val", mesh: Mesh | None = None) -> EvalBatches:
  """An iterable over the whole split once (see `EvalBatches`)."""
  return EvalBatches(config, split, mesh)
