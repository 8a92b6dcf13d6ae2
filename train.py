"""Trains and evaluates Deformable DETR: `python train.py` runs the embedded shapes demo.

  python train.py                                   # configs/shapes.py in ./runs/shapes
  python train.py --config configs/deformable_detr.py:box_refine --workdir DIR \\
      --config.data.tfds_data_dir=...               # COCO 2017
  python train.py --config configs/tiny.py --config.train.num_train_steps=10 --workdir /tmp/t

A run resumes automatically from DIR/checkpoints; started again after it finished, it reports the
evaluation stored in DIR/metrics.jsonl instead of evaluating again. Multi-host (TPU pods,
multi-node GPU): start the same command on every host with `--distributed`
(jax.distributed.initialize() auto-detects TPU pods, SLURM and Open MPI) or with explicit
--coordinator_address=HOST:PORT --num_processes=N --process_id=I; config.train.global_batch_size
is the batch over all devices of all hosts.

Errors in the config, checkpoint or data paths print `error: ...` and exit with status 2;
`--verbosity=0` shows the INFO logs (orbax's saves and restores).
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ddetr_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shapes.py")
cli.check_config_overrides(sys.argv, _DEFAULT_CONFIG)  # before ml_collections applies them.
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file (optionally `path.py:variant`).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "./runs/shapes", "Where checkpoints, metrics and "
                               "plots are written.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                                 "cluster auto-detection (TPU pods, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for "
                                   "jax.distributed.initialize (multi-host without auto-detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with "
                                   "--coordinator_address).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ddetr_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.tune()  # before JAX allocates: large XLA:CPU buffers stay mapped between steps.
  import jax  # pylint: disable=g-import-not-at-top
  cli.start_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                        _PROCESS_ID.value)
  from ddetr_jax import trainer  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  metrics = trainer.train_and_evaluate(_CONFIG.value, workdir)
  if jax.process_index() == 0:
    print("\n" + trainer.final_summary(workdir, metrics))


if __name__ == "__main__":
  cli.run(main)
