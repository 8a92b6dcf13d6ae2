"""Evaluates a Deformable DETR checkpoint on COCO-style data, or predicts on image files.

COCO evaluation of the configured validation split (prints the 12 metrics and writes
WORKDIR/coco_metrics.json and WORKDIR/coco_results.json):
  python eval.py --config configs/deformable_detr.py:default --checkpoint DIR --workdir W
  python eval.py --config configs/deformable_detr.py:default --torch_checkpoint r50_deformable_detr-checkpoint.pth
Predictions (annotated images, sampling-point pictures, detections.json) on any images:
  python eval.py --config ... --checkpoint DIR --predict 'photos/*.jpg' --out OUT
  python eval.py --config configs/shapes.py --checkpoint W/checkpoints --predict_val 4 --out OUT
`--predict_val N` takes the first N validation images; with data.source='tfds' (no image files)
they are first copied, still encoded, to OUT/validation_images/.
`--checkpoint` is an orbax directory: a training CheckpointManager root (latest step), one of its
step folders, or a converted checkpoint (`python -m ddetr_jax.convert`); its params must fit
the config's model (the error names every parameter that does not).
Errors in the config, checkpoint or data paths print `error: ...` and exit with status 2;
`--verbosity=0` shows the INFO logs (orbax's restores, the COCOeval table).
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ddetr_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shapes.py")
cli.check_config_overrides(sys.argv, _DEFAULT_CONFIG)  # before ml_collections applies them.
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (`path.py:variant`).",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/eval", "Where coco_metrics.json and coco_results.json go.")
flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory holding the params.")
flags.DEFINE_string("torch_checkpoint", None, "PyTorch checkpoint, converted on the fly.")
flags.DEFINE_list("predict", None, "Image files, directories or glob patterns to predict on.")
flags.DEFINE_integer("predict_val", 0, "Predict on the first N validation images instead.")
flags.DEFINE_string("out", None, "Output directory of --predict (default WORKDIR/predictions).")
flags.DEFINE_float("threshold", None, "Score threshold for drawn detections "
                   "(default config.eval.score_threshold).")
flags.DEFINE_integer("num_attention", 1, "Sampling-point pictures per predicted image.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster "
                  "auto-detection (TPU pods, SLURM, Open MPI).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for "
                    "jax.distributed.initialize (multi-host without auto-detection).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ddetr_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.tune()  # before JAX allocates: large XLA:CPU buffers stay mapped between steps.
  import jax  # pylint: disable=g-import-not-at-top
  from ddetr_jax import errors  # pylint: disable=g-import-not-at-top
  if FLAGS.predict_val < 0:
    raise errors.InvalidInputError(f"--predict_val={FLAGS.predict_val}: give a number of "
                                   f"validation images >= 1 (0: off)")
  if bool(FLAGS.checkpoint) == bool(FLAGS.torch_checkpoint):
    raise errors.InvalidInputError(
        f"give one of --checkpoint=DIR (orbax) or --torch_checkpoint=FILE (PyTorch), not "
        f"{'both' if FLAGS.checkpoint else 'neither'}")
  cli.start_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                        FLAGS.process_id)
  for name in ("workdir", "checkpoint", "torch_checkpoint", "out"):  # `--out=~/x` is not
    if getattr(FLAGS, name):                                         # expanded by the shell.
      setattr(FLAGS, name, os.path.expanduser(getattr(FLAGS, name)))
  from ddetr_jax import evaluator, output_folder, predict, sharding, trainer  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models import build_model  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  model = build_model(config)
  step = None
  if FLAGS.checkpoint:
    _, step = evaluator.checkpoint_params_dir(FLAGS.checkpoint)
    params = evaluator.load_params(FLAGS.checkpoint,
                                   expected=trainer.abstract_params(model, config))
  else:
    from ddetr_jax import convert  # pylint: disable=g-import-not-at-top
    params = convert.load_torch_params(FLAGS.torch_checkpoint, config)

  if FLAGS.predict or FLAGS.predict_val:
    out_dir = FLAGS.out or os.path.join(FLAGS.workdir, "predictions")
    if jax.process_index() != 0:
      return  # predictions run on one process.
    output_folder.make(out_dir, f"--out={out_dir!r}" if FLAGS.out
                       else f"--workdir={FLAGS.workdir!r}: its {out_dir!r}")
    patterns = FLAGS.predict or predict.validation_images(
        config, FLAGS.predict_val, export_dir=os.path.join(out_dir, "validation_images"))
    summary = predict.predict_files(model, params, config, patterns, out_dir,
                                    threshold=FLAGS.threshold, num_attention=FLAGS.num_attention)
    pictures = ", their sampling-point pictures" if FLAGS.num_attention > 0 else ""
    print(f"wrote {len(summary['images'])} annotated images{pictures} and their detections "
          f"(json) to {os.path.abspath(out_dir)}"
          + (f"; skipped {len(summary['skipped'])} unreadable" if summary["skipped"] else ""))
    return

  if jax.process_index() == 0:
    output_folder.make(FLAGS.workdir, f"--workdir={FLAGS.workdir!r}")
  metrics = evaluator.evaluate(model, params, config, mesh=sharding.make_mesh(),
                               workdir=FLAGS.workdir, step=step)
  if jax.process_index() == 0:
    for name in evaluator.METRIC_NAMES:
      print(f"{name:>6s} {metrics[name]:.4f}")
    print(f"evaluated {metrics['num_images']} images")
    print(f"wrote coco_metrics.json and coco_results.json to {os.path.abspath(FLAGS.workdir)}")


if __name__ == "__main__":
  cli.run(main)
