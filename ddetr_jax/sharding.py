"""The device mesh and how arrays are laid out on it: data parallelism over one 'data' axis.

Every device of every process is on the mesh's single axis `data`. Batches are split along their
leading (batch) axis over `data`; params, optimizer state, the step and the RNG are replicated.
One jitted step with these shardings is all the parallelism there is (no pmap): XLA inserts the
gradient all-reduce.

Multi-host: every process calls `jax.distributed.initialize()` (TPU pods and SLURM/Cloud GPU
clusters are auto-detected; otherwise pass coordinator_address, num_processes, process_id) before
anything else touches JAX; `make_mesh()` then spans `jax.devices()`, i.e. all processes' devices,
and each process feeds its own `global_batch / process_count` rows (`shard_batch`).
"""
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddetr_jax import errors

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D Mesh with axis 'data' over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices given")
  return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (params, optimizer state, step, rng)."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(global_batch_size: int, mesh: Mesh,
                          what: str = "train.global_batch_size") -> int:
  """Raises unless the global batch splits evenly over the mesh; returns rows per device.

  Args:
    global_batch_size: images per step over all processes.
    mesh: the mesh; its 'data' axis size is the device count.
    what: the config key named in the error.
  """
  num_devices = mesh.shape[DATA_AXIS]
  if global_batch_size <= 0:
    raise errors.InvalidInputError(
        f"{what}={global_batch_size}: the batch needs at least one image per device; use a "
        f"positive multiple of the number of devices {num_devices}")
  if global_batch_size % num_devices:
    raise errors.InvalidInputError(
        f"{what}={global_batch_size} is not divisible by the number of devices {num_devices} "
        f"(mesh axis '{DATA_AXIS}' over {jax.process_count()} process(es)); use a multiple of "
        f"{num_devices}")
  return global_batch_size // num_devices


def shard_batch(batch: Mapping[str, Any], mesh: Mesh,
                keys: Sequence[str] = ("images", "padding_mask", "boxes", "labels", "box_mask")
                ) -> dict:
  """This process's rows of a batch -> global arrays sharded over 'data'.

  Args:
    batch: dict of numpy arrays [B_local, ...] (B_local = global batch / process count) or of
      arrays that already are global jax.Arrays (left as they are).
    mesh: the mesh.
    keys: the device fields; other keys (host-only: image_id, orig_size, ...) are passed through.

  Returns:
    a dict with the same keys; `keys` entries are jax.Arrays of shape [B_global, ...].
  """
  sharding = batch_sharding(mesh)
  out = dict(batch)
  for key in keys:
    value = batch[key]
    if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
      continue
    out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf of `tree` (identical on all processes) on every device of the mesh.

  Leaves that already are replicated on `mesh` are kept as they are.
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    # Multi-process: each process supplies its (identical) copy for its own devices.
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)

  return jax.tree.map(put, tree)
