"""Two JAX processes building one global batch agree on its bucket.

Each process collates only its own images, so on its own it could pick a smaller bucket than the
other; the loader must pad both to the same side (the largest), or
`make_array_from_process_local_data` would be given mismatched shapes.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from ddetr_jax.data import batching
from tests import loader_worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_pad_to_shape_pads_images_with_zeros_and_mask_with_true():
  batch = {"images": np.ones((2, 3, 4, 3), np.float32), "padding_mask": np.zeros((2, 3, 4), bool),
           "boxes": np.full((2, 1, 4), 0.5, np.float32)}
  out = batching.pad_to_shape(batch, 5, 6)
  assert out["images"].shape == (2, 5, 6, 3) and out["padding_mask"].shape == (2, 5, 6)
  assert (out["images"][:, :3, :4] == 1).all() and (out["images"][:, 3:] == 0).all()
  assert (out["images"][:, :, 4:] == 0).all()
  assert not out["padding_mask"][:, :3, :4].any() and out["padding_mask"][:, 3:].all()
  assert out["padding_mask"][:, :, 4:].all()
  assert (out["boxes"] == batch["boxes"]).all()
  assert batching.pad_to_shape(batch, 3, 4) is batch
  with pytest.raises(ValueError, match="cannot pad a batch of 3x4 down to 3x3"):
    batching.pad_to_shape(batch, 3, 3)


def test_two_processes_agree_on_the_bucket(tmp_path):
  # With fine buckets the bucket a process would pick for its own images differs between the
  # processes in some batches.
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.loader_worker", "--coordinator", f"127.0.0.1:{port}",
       "--process_id", str(i), "--cache_dir", str(tmp_path / "cache"), "--num_batches", "6",
       "--result", str(tmp_path / f"r{i}.json")],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=240)[0])
    finally:
      if proc.poll() is None:
        proc.kill()
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i}:\n{out[-3000:]}"
  results = [json.load(open(tmp_path / f"r{i}.json")) for i in range(2)]
  local_buckets_differ = non_square = False
  for b0, b1 in zip(*results):
    assert b0["global_shape"] == b1["global_shape"]
    # Rectangular buckets: each process's own (H, W); the global batch takes the larger of each.
    own = [batching.select_bucket_shape(max(h for h, _ in b["size"]), max(w for _, w in b["size"]),
                                        loader_worker.BUCKETS, "rect") for b in (b0, b1)]
    assert tuple(b0["global_shape"][1:3]) == (max(own[0][0], own[1][0]), max(own[0][1], own[1][1]))
    local_buckets_differ |= own[0] != own[1]
    non_square |= b0["global_shape"][1] != b0["global_shape"][2]
    assert not set(b0["image_id"]) & set(b1["image_id"])  # disjoint shards
  assert local_buckets_differ, "no batch exercised differing per-process buckets"
  assert non_square, "no batch had a rectangular global shape"
