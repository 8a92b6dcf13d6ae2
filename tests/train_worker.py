"""Runs `trainer.train_and_evaluate` in a subprocess, for the resume, preemption and multi-process
tests (test_trainer.py, test_multiprocess.py); also defines the small config they share.

  python -m tests.train_worker --workdir DIR [--devices N] [--pause_at K --go_file F]
      [--coordinator HOST:PORT --num_processes P --process_id I] [--result out.json]

--pause_at K: the K-th request for a training batch (1-based) prints PAUSED and waits until
--go_file exists (the test signals the process meanwhile). The persistent XLA compilation cache
(`CACHE_DIR`) is shared with the in-process tests, so identical programs compile once. Like
`train.py`, the worker dispatches synchronously on the CPU (`ddetr_jax.cpu_dispatch`), so the
multi-process and resume tests run the entry points' dispatch mode (the in-process reference
runs JAX's asynchronous default: the results must not depend on it).
"""
import argparse
import json
import os
import sys
import tempfile
import time

CACHE_DIR = os.path.join(tempfile.gettempdir(), f"ddetr_jax_test_xla_cache_{os.getuid()}")
NUM_STEPS = 6


def small_config(num_steps: int = NUM_STEPS, eval_every: int = 0):
  """configs/tiny.py:single_scale cut further (1+1 layers, 64 px, one bucket) for fast compiles."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config("single_scale")
  config.model.enc_layers = 1
  config.model.dec_layers = 2  # one aux output: the aux loss path stays tested.
  config.model.num_queries = 8
  d = config.data
  d.train_scales = (48, 56, 64)
  d.train_max_size = 64
  d.crop_resize_scales = (48, 56)
  d.crop_min_size = 32
  d.crop_max_size = 48
  d.val_scale = 64
  d.val_max_size = 64
  d.buckets = (64,)  # one shape: every process pads to the same size.
  d.max_boxes = 4
  config.train.global_batch_size = 8
  config.train.num_train_steps = num_steps
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 10
  config.train.log_every = 1
  config.train.eval_every = eval_every
  config.eval.batch_size = 8
  return config


def assert_params_match(actual: dict, desired: dict, lr: float, steps: int) -> None:
  """Flat {path: array} params of two runs of the same training agree to float32 tolerance.

  The bias of each input projection's conv feeds a GroupNorm, which removes any per-channel
  constant: its true gradient is zero and what arrives is rounding noise, whose sign depends on
  the summation order (the device count). Adam turns that noise into steps of up to lr each, so
  those biases are only checked to stay within the Adam bound of 2 * lr * steps of each other.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert actual.keys() == desired.keys()
  for key in desired:
    if key.startswith("input_proj_") and key.endswith("conv/bias"):
      assert np.abs(np.asarray(actual[key]) - np.asarray(desired[key])).max() <= 2 * lr * steps, key
    else:
      np.testing.assert_allclose(actual[key], desired[key], rtol=1e-4, atol=2e-5, err_msg=key)


def use_compilation_cache():
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _pause_iterators(pause_at: int, go_file: str):
  """Makes the trainer's data iterator block at its `pause_at`-th batch until `go_file` exists."""
  from ddetr_jax import trainer  # pylint: disable=g-import-not-at-top
  make = trainer.data_lib.make_train_iterator

  class Pausing:

    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      self.count += 1
      if self.count == pause_at:
        print("\nPAUSED", flush=True)
        deadline = time.time() + 300  # never outlive a test that died.
        while not os.path.exists(go_file):
          if time.time() > deadline:
            raise TimeoutError(f"{go_file} did not appear within 300 s")
          time.sleep(0.05)
      return next(self.inner)

    def __getattr__(self, name):
      return getattr(self.inner, name)

  trainer.data_lib.make_train_iterator = lambda *a, **k: Pausing(make(*a, **k))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--devices", type=int, default=0, help="mesh over the first N devices")
  parser.add_argument("--pause_at", type=int, default=0)
  parser.add_argument("--go_file", default="")
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--result", default="")
  parser.add_argument("--eval_every", type=int, default=0, help="config.train.eval_every")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from ddetr_jax import cpu_dispatch  # pylint: disable=g-import-not-at-top
  cpu_dispatch.use_synchronous_cpu_dispatch()  # as train.py (cli.run) does
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  use_compilation_cache()
  from ddetr_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  if args.pause_at:
    _pause_iterators(args.pause_at, args.go_file)
  mesh = sharding.make_mesh(jax.devices()[:args.devices] if args.devices else None)
  result = trainer.train_and_evaluate(small_config(eval_every=args.eval_every), args.workdir,
                                      mesh=mesh)
  result.update(process_count=jax.process_count(), mesh_devices=int(mesh.devices.size))
  if args.result and jax.process_index() == 0:
    with open(args.result, "w") as f:
      json.dump(result, f)
  print("DONE", json.dumps(result), flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
