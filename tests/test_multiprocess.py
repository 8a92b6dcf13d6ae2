"""Two processes x 2 CPU devices through jax.distributed (gloo collectives) train like 1 device.

Each process runs tests/train_worker.py with XLA_FLAGS=--xla_force_host_platform_device_count=2;
the global batch (8) is split 4 + 4 over the processes (disjoint records, the data pipeline's
interleaved order) and 2 + 2 over each process's devices. Reference: the same config on 1 device.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddetr_jax import evaluator
from ddetr_jax import sharding
from ddetr_jax import trainer
from tests import train_worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = train_worker.NUM_STEPS


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if r["kind"] == "train"}


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_two_processes_two_devices_each_match_one_device(tmp_path):
  port = _free_port()
  workdir = str(tmp_path / "multi")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.train_worker", "--workdir", workdir,
       "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
       "--result", str(tmp_path / f"result_{i}.json"), "--eval_every", "-1"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]

  previous = jax.config.jax_compilation_cache_dir
  train_worker.use_compilation_cache()
  try:
    # Meanwhile, the 1-device reference in this process.
    reference = str(tmp_path / "single")
    trainer.train_and_evaluate(train_worker.small_config(eval_every=-1), reference,
                               mesh=sharding.make_mesh(jax.devices()[:1]))
    outputs = [p.communicate(timeout=480)[0] for p in procs]
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i}:\n{out[-4000:]}"
  with open(tmp_path / "result_0.json") as f:
    result = json.load(f)
  assert result["step"] == STEPS
  assert result["process_count"] == 2 and result["mesh_devices"] == 4

  multi, single = _losses(workdir), _losses(reference)
  assert sorted(multi) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "num_boxes"):
      assert multi[step][key] == pytest.approx(single[step][key], rel=2e-4, abs=1e-6), (step, key)
  final_multi = _flat(evaluator.load_params(os.path.join(workdir, "checkpoints", str(STEPS))))
  final_single = _flat(evaluator.load_params(os.path.join(reference, "checkpoints", str(STEPS))))
  train_worker.assert_params_match(final_multi, final_single,
                                   train_worker.small_config().optim.lr, STEPS)
  # Evaluation on the 2-process mesh: every validation image once, gathered on process 0, the
  # same detections and metrics as on one device.
  def detections(directory):
    with open(os.path.join(directory, "coco_results.json")) as f:
      return sorted((d["image_id"], d["category_id"], round(d["score"], 4)) for d in json.load(f))
  det_multi, det_single = detections(workdir), detections(reference)
  assert len(det_multi) == len(det_single) > 0
  assert {d[0] for d in det_multi} == {d[0] for d in det_single}
  np.testing.assert_allclose([d[2] for d in det_multi], [d[2] for d in det_single], atol=2e-3)
  with open(os.path.join(workdir, "coco_metrics.json")) as f:
    metrics_multi = json.load(f)
  with open(os.path.join(reference, "coco_metrics.json")) as f:
    metrics_single = json.load(f)
  for name in ("AP", "AP50", "AR100"):
    assert metrics_multi[name] == pytest.approx(metrics_single[name], abs=1e-3), name
  # Each process saved its own data-iterator state.
  step_dir = os.path.join(workdir, "checkpoints", str(STEPS), "data_state")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir))
