"""sharding.py on 8 fake CPU devices: mesh, batch split, replication, divisibility errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddetr_jax import sharding


def test_mesh_has_data_axis_over_all_devices():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.shape["data"] == len(jax.devices()) == 8
  assert sharding.make_mesh(jax.devices()[:2]).shape["data"] == 2


def test_shard_batch_splits_rows_and_keeps_host_fields():
  mesh = sharding.make_mesh()
  images = np.arange(16 * 4 * 4 * 3, dtype=np.float32).reshape(16, 4, 4, 3)
  batch = {"images": images, "padding_mask": np.zeros((16, 4, 4), bool),
           "boxes": np.ones((16, 3, 4), np.float32), "labels": np.zeros((16, 3), np.int32),
           "box_mask": np.ones((16, 3), bool), "image_id": np.arange(16)}
  out = sharding.shard_batch(batch, mesh)
  assert out["image_id"] is batch["image_id"]  # host-only field untouched.
  shards = sorted(out["images"].addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8
  for i, shard in enumerate(shards):  # device i holds rows 2i, 2i + 1.
    np.testing.assert_array_equal(np.asarray(shard.data), images[2 * i:2 * i + 2])
  np.testing.assert_array_equal(np.asarray(out["images"]), images)
  again = sharding.shard_batch(out, mesh)  # already sharded arrays are kept.
  assert again["images"] is out["images"]


def test_replicate_puts_a_full_copy_on_every_device():
  mesh = sharding.make_mesh()
  tree = {"w": np.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  out = sharding.replicate(tree, mesh)
  for leaf, ref in ((out["w"], tree["w"]), (out["b"], np.ones(3))):
    assert len(leaf.addressable_shards) == 8
    for shard in leaf.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), ref)
  assert sharding.replicate(out, mesh)["w"] is out["w"]


def test_jitted_sum_over_sharded_batch_equals_numpy():
  mesh = sharding.make_mesh()
  x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  xs = jax.device_put(x, sharding.batch_sharding(mesh))
  total = jax.jit(lambda a: (a * a).sum(), out_shardings=sharding.replicated(mesh))(xs)
  np.testing.assert_allclose(float(total), float((x.astype(np.float64)**2).sum()), rtol=1e-5)


@pytest.mark.parametrize("batch", [6, 12])
def test_batch_not_divisible_names_both_numbers(batch):
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match=rf"train.global_batch_size={batch} is not divisible by "
                                       rf"the number of devices 8"):
    sharding.check_batch_divisible(batch, mesh)


@pytest.mark.parametrize("batch", [0, -8])
def test_batch_not_positive_says_so(batch):
  with pytest.raises(ValueError, match=rf"eval.batch_size={batch}: the batch needs at least one "
                                       rf"image per device; .* devices 1"):
    sharding.check_batch_divisible(batch, sharding.make_mesh(jax.devices()[:1]), "eval.batch_size")


def test_divisible_batch_returns_rows_per_device():
  assert sharding.check_batch_divisible(16, sharding.make_mesh()) == 2
  assert sharding.check_batch_divisible(6, sharding.make_mesh(jax.devices()[:3]), "eval.batch_size") == 2
