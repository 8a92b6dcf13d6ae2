"""Loaders: determinism, per-process shards, exact resume, bucket shapes, masks, sharded arrays."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import tiny
from ddetr_jax import data
from ddetr_jax.data import batching


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("shapes_cache"))


def _config(cache_dir, **data_overrides):
  config = tiny.get_config()            # 16 train / 8 val shapes images, buckets (64, 128).
  config.data.cache_dir = cache_dir
  config.data.update(data_overrides)
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_same_seed_same_batches_other_seed_differs(cache_dir):
  config = _config(cache_dir)
  _assert_same(_take(data.make_train_iterator(config), 3), _take(data.make_train_iterator(config), 3))
  other = _take(data.make_train_iterator(_config(cache_dir, seed=7)), 3)
  assert any(not np.array_equal(a["image_id"], b["image_id"])
             for a, b in zip(_take(data.make_train_iterator(config), 3), other))


def test_processes_read_disjoint_shards_covering_each_epoch(cache_dir, monkeypatch):
  config = _config(cache_dir)           # global batch 8, 16 images: 2 batches per epoch.
  single = [b["image_id"] for b in _take(data.make_train_iterator(config), 4)]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  per_process = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    batches = _take(data.make_train_iterator(config), 4)
    assert all(b["images"].shape[0] == 4 for b in batches)
    per_process.append([b["image_id"] for b in batches])
  for epoch in range(2):
    ids = [per_process[p][2 * epoch + s] for p in range(2) for s in range(2)]
    ids = np.concatenate(ids)
    assert sorted(ids.tolist()) == list(range(1, 17))       # disjoint and covering.
    # Both processes together read what one process reads (same stream, interleaved).
    assert sorted(ids.tolist()) == sorted(np.concatenate(single[2 * epoch:2 * epoch + 2]).tolist())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_exactly_the_same_batches(cache_dir, num_workers):
  config = _config(cache_dir, num_workers=num_workers)
  iterator = data.make_train_iterator(config)
  _take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))     # survives a JSON round trip.
  expected = _take(iterator, 3)                             # crosses an epoch boundary.
  iterator.close()
  resumed = data.make_train_iterator(config, start_state=state)
  _assert_same(_take(resumed, 3), expected)
  resumed.close()


def test_buckets_and_masks(cache_dir):
  config = _config(cache_dir)
  iterator = data.make_train_iterator(config)
  shapes = set()
  for batch in _take(iterator, 6):
    shapes.add(batch["images"].shape)
    for i, (height, width) in enumerate(batch["size"]):
      mask = batch["padding_mask"][i]
      assert not mask[:height, :width].any() and mask.sum() == mask.size - height * width
      assert not batch["images"][i][mask].any()
    n = batch["box_mask"].sum(1)
    for i in range(len(n)):
      assert batch["box_mask"][i, :n[i]].all()
      boxes = batch["boxes"][i, :n[i]]
      assert ((boxes > 0) & (boxes <= 1)).all()
      assert (batch["labels"][i, :n[i]] >= 1).all() and (batch["labels"][i, :n[i]] <= 4).all()
      assert not batch["boxes"][i, n[i]:].any()
    assert batch["boxes"].shape == (8, 8, 4) and batch["labels"].dtype == np.int32
    assert batch["image_id"].dtype == np.int64 and batch["valid"].all()
  assert shapes <= {(8, 64, 64, 3), (8, 128, 128, 3)}


def test_global_arrays_on_a_mesh(cache_dir):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  config = _config(cache_dir)
  batch = next(data.make_train_iterator(config, mesh=mesh))
  plain = next(data.make_train_iterator(config))
  for key in batching.DEVICE_KEYS:
    assert isinstance(batch[key], jax.Array) and len(batch[key].sharding.device_set) == 8
    assert batch[key].sharding.spec[0] == "data"
    np.testing.assert_array_equal(np.asarray(batch[key]), plain[key])
  for key in batching.HOST_KEYS:
    assert isinstance(batch[key], np.ndarray)
  config.train.global_batch_size = 4
  with pytest.raises(ValueError, match=r"global_batch_size=4 .*number of devices 8"):
    data.make_train_iterator(config, mesh=mesh)


def test_eval_covers_every_image_once_with_fillers(cache_dir, monkeypatch):
  config = _config(cache_dir)
  config.eval.batch_size = 3          # 8 val images -> 3 batches, the last with 1 filler.
  batches = list(data.make_eval_batches(config))
  assert len(batches) == 3
  ids = np.concatenate([b["image_id"][b["valid"]] for b in batches])
  assert sorted(ids.tolist()) == list(range(1, 9))
  assert batches[-1]["valid"].tolist() == [True, True, False]
  assert not batches[-1]["box_mask"][2].any()
  gt = data.coco_ground_truth(config.data, "val")
  for batch in batches:
    for image_id, orig, valid in zip(batch["image_id"], batch["orig_size"], batch["valid"]):
      if valid:
        assert orig.tolist() == [gt.imgs[image_id]["height"], gt.imgs[image_id]["width"]]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  config.eval.batch_size = 6          # 3 per process, 4 images per process -> 2 batches each.
  seen = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    process_batches = list(data.make_eval_batches(config))
    assert len(process_batches) == 2
    seen += [i for b in process_batches for i in b["image_id"][b["valid"]].tolist()]
  assert sorted(seen) == list(range(1, 9))
