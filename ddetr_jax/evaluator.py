"""COCO evaluation: jitted forward + post-processing on the mesh, pycocotools COCOeval on the host.

`evaluate` runs the model over every validation record exactly once (`make_eval_batches`),
keeps the official top-100 detections per image, maps label ids back to the dataset's category
ids, and writes
  WORKDIR/coco_results.json  the detections in COCO results format (image_id, category_id,
                             bbox [x, y, w, h] in original pixels, score)
  WORKDIR/coco_metrics.json  the 12 COCOeval numbers under METRIC_NAMES, plus `num_images`
                             (images evaluated) and `step`.
The pure part, `coco_metrics(gt_coco, detections)`, needs no model.
"""
import contextlib
import io
import json
import logging
import os
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import tqdm

from ddetr_jax import checkpoint as checkpoint_lib
from ddetr_jax import data as data_lib
from ddetr_jax import errors
from ddetr_jax.postprocess import postprocess

# COCOeval.stats order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def label_to_category_table(label_to_category_id: dict[int, int], num_classes: int) -> np.ndarray:
  """[num_classes] int64: dataset category id of each label id, -1 where none maps to it."""
  table = np.full(num_classes, -1, np.int64)
  for label, category in label_to_category_id.items():
    if 0 <= label < num_classes:
      table[label] = category
  return table


def coco_detections(image_ids: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    boxes: np.ndarray, category_table: np.ndarray) -> list[dict]:
  """Detections in COCO results format.

  Args:
    image_ids: [N] dataset image ids.
    scores: [N, K] float; labels: [N, K] int label ids; boxes: [N, K, 4] xyxy pixels.
    category_table: [C] category id per label id (`label_to_category_table`); detections whose
      label maps to no category (-1, e.g. COCO's unused ids) are dropped: COCOeval would ignore
      them anyway.
  Returns:
    list of {'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}.
  """
  category_ids = category_table[np.asarray(labels)]  # [N, K]
  boxes = np.asarray(boxes, np.float64)
  xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], -1)  # [N, K, 4]
  detections = []
  for i, image_id in enumerate(np.asarray(image_ids)):
    for k in np.flatnonzero(category_ids[i] >= 0):
      detections.append({"image_id": int(image_id), "category_id": int(category_ids[i, k]),
                         "bbox": [float(v) for v in xywh[i, k]],
                         "score": float(scores[i, k])})
  return detections


def coco_metrics(gt_coco: COCO, detections: list[dict], verbose: bool = False) -> dict[str, float]:
  """COCOeval bbox metrics of `detections` (COCO results format) on all images of `gt_coco`.

  Returns {name: value} for the 12 METRIC_NAMES (0.0 for all when there are no detections).
  With `verbose`, pycocotools' summary table is logged.
  """
  if not detections:
    logging.warning("no detections: every COCO metric is 0")
    return {name: 0.0 for name in METRIC_NAMES}
  unknown = {d["image_id"] for d in detections} - set(gt_coco.getImgIds())
  if unknown:
    raise ValueError(f"detections refer to image ids not in the ground truth: "
                     f"{sorted(unknown)[:10]}")
  output = io.StringIO()
  with contextlib.redirect_stdout(output):
    dt_coco = gt_coco.loadRes(detections)
    coco_eval = COCOeval(gt_coco, dt_coco, "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  if verbose:
    logging.info("COCOeval:\n%s", output.getvalue())
  return {name: float(value) for name, value in zip(METRIC_NAMES, coco_eval.stats)}


def _local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in local batch order."""
  if not isinstance(array, jax.Array) or array.is_fully_addressable:
    return np.asarray(array)
  shards = {}
  for shard in array.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def make_predict_fn(model, num_top: int, mesh: Optional[Mesh] = None) -> Callable:
  """Jitted (params, images, padding_mask, orig_size) -> post-processed detections.

  images [B, H, W, 3], padding_mask [B, H, W], orig_size [B, 2] (h, w) -> dict of
  `postprocess` (scores/labels/boxes/query with K = num_top). With a mesh the batch is sharded
  along 'data' and the params replicated.
  """
  def predict(params, images, padding_mask, orig_size):
    outputs = model.apply({"params": params}, images, padding_mask, train=False)
    return postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_size, num_top)

  if mesh is None:
    return jax.jit(predict)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch = NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(predict, in_shardings=(replicated, batch, batch, batch), out_shardings=batch)


def _gather_hosts(tree: Any) -> Any:
  """Concatenates equal-shape per-process numpy arrays along axis 0 (identity on one process)."""
  if jax.process_count() == 1:
    return tree
  gathered = multihost_utils.process_allgather(tree)  # leaves [P, ...]
  return jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), gathered)


def evaluate(model, params, config, mesh: Optional[Mesh] = None, workdir: Optional[str] = None,
             step: Optional[int] = None, split: str = "val") -> dict[str, float]:
  """COCO bbox evaluation of `model` with `params` on `config`'s validation split.

  Args:
    model: the Flax detector (`build_model(config)`).
    params: its 'params' pytree.
    config: full config (uses config.data, config.eval.batch_size, config.eval.num_top,
      config.model.num_classes).
    mesh: a Mesh with a 'data' axis, or None for the default device.
    workdir: if given, process 0 writes coco_results.json and coco_metrics.json there.
    step: training step recorded in coco_metrics.json (null there when None).
    split: 'val' (or 'train').
  Returns:
    {metric name: value} for METRIC_NAMES, 'num_images' (the images evaluated: the split's
    records minus undecodable ones) and 'step' (None when not given, e.g. for converted weights).
  """
  batches = data_lib.make_eval_batches(config, split, mesh)
  categories = data_lib.categories(config.data)
  table = label_to_category_table(categories.label_to_category_id, config.model.num_classes)
  predict = make_predict_fn(model, int(config.eval.num_top), mesh)
  batch_sharding = None
  if mesh is not None:
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

  host = {"image_id": [], "valid": [], "scores": [], "labels": [], "boxes": []}
  progress = tqdm.tqdm(batches, total=len(batches), desc="eval", unit="batch",
                       disable=jax.process_index() != 0)
  for batch in progress:
    orig_size = np.asarray(batch["orig_size"], np.float32)  # [B_local, 2]
    if batch_sharding is not None:
      orig_size = jax.make_array_from_process_local_data(batch_sharding, orig_size)
    out = predict(params, batch["images"], batch["padding_mask"], orig_size)
    host["image_id"].append(np.asarray(batch["image_id"], np.int64))
    host["valid"].append(np.asarray(batch["valid"], bool))
    for key in ("scores", "labels", "boxes"):
      host[key].append(_local_rows(out[key]))
  local = {key: np.concatenate(value) for key, value in host.items()}
  local["num_skipped"] = np.array([batches.stats["num_skipped"]], np.int64)
  gathered = _gather_hosts(local)

  valid = gathered["valid"]
  image_ids = gathered["image_id"][valid]
  num_skipped = int(gathered["num_skipped"].sum())
  unique_ids, counts = np.unique(image_ids, return_counts=True)
  if (counts > 1).any():
    raise RuntimeError(f"images evaluated more than once: ids {unique_ids[counts > 1][:10]}")
  if len(image_ids) + num_skipped != batches.num_records:
    raise RuntimeError(f"evaluated {len(image_ids)} images (+ {num_skipped} undecodable) but the "
                       f"{split!r} split has {batches.num_records}")
  if num_skipped and num_skipped == batches.num_records:
    example = f", e.g. {batches.first_error}" if batches.first_error else ""
    raise data_lib.CorruptImageError(
        f"none of the {num_skipped} images of the {split!r} split could be decoded{example}; "
        f"check the images data.source={config.data.source!r} reads")
  if num_skipped:
    logging.warning("%d undecodable images were not evaluated (they count as missed)",
                    num_skipped)
  detections = coco_detections(image_ids, gathered["scores"][valid], gathered["labels"][valid],
                               gathered["boxes"][valid], table)
  gt_coco = data_lib.coco_ground_truth(config.data, split)
  if len(gt_coco.getImgIds()) != batches.num_records:
    raise RuntimeError(f"the ground truth has {len(gt_coco.getImgIds())} images but the "
                       f"{split!r} split has {batches.num_records} records")
  metrics = coco_metrics(gt_coco, detections, verbose=True)
  metrics["num_images"] = len(image_ids)
  metrics["step"] = None if step is None else int(step)  # null in the json: not known.
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "coco_results.json"), "w") as f:
      json.dump(detections, f)
    with open(os.path.join(workdir, "coco_metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  logging.info("COCO metrics on %d images%s: %s", len(image_ids),
               "" if step is None else f" at step {step}",
               " ".join(f"{k}={metrics[k]:.4f}" for k in METRIC_NAMES))
  return metrics


def _is_step_dir(name: str) -> bool:
  return name.isdigit()


def checkpoint_params_dir(checkpoint_dir: str) -> tuple[str, Optional[int]]:
  """The orbax item directory holding the params, and its step (None for a plain checkpoint).

  Accepts a CheckpointManager directory (numbered step folders, latest taken, item 'params'),
  one step folder of it (holding 'params/'; its step is the folder's number), or a plain
  PyTree checkpoint (e.g. from convert).
  """
  if os.path.isfile(checkpoint_dir):
    raise errors.InvalidInputError(
        f"{checkpoint_dir!r} is a file, not an orbax checkpoint folder; a PyTorch checkpoint goes "
        f"to --torch_checkpoint (eval.py) or is converted with `python -m ddetr_jax.convert`")
  if not os.path.isdir(checkpoint_dir):
    raise errors.MissingInputError(f"checkpoint directory not found: {checkpoint_dir!r}")
  names = os.listdir(checkpoint_dir)
  steps = sorted(int(n) for n in names if _is_step_dir(n)
                 and os.path.isdir(os.path.join(checkpoint_dir, n)))
  if steps:
    step_dir = os.path.join(checkpoint_dir, str(steps[-1]))
    params_dir = os.path.join(step_dir, "params")
    if not os.path.isdir(params_dir):
      raise errors.MissingInputError(f"checkpoint step folder {step_dir!r} has no 'params' item "
                                     f"(has {sorted(os.listdir(step_dir))})")
    return params_dir, steps[-1]
  if "params" in names and os.path.isdir(os.path.join(checkpoint_dir, "params")):
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    return os.path.join(checkpoint_dir, "params"), int(name) if _is_step_dir(name) else None
  return checkpoint_dir, None


def _unwrap_params(tree: Any) -> Any:
  """`tree['params']` for a checkpoint of {'params': params} (convert.save_params), else `tree`."""
  if isinstance(tree, Mapping) and set(tree) == {"params"}:
    return tree["params"]
  return tree


def _workdir_hint(checkpoint_dir: str) -> str:
  """'; did you mean DIR/checkpoints?' when `checkpoint_dir` is a training workdir."""
  inner = os.path.join(checkpoint_dir, "checkpoints")
  return f"; did you mean {inner!r} (a training run's checkpoints)?" if os.path.isdir(inner) else ""


def load_params(checkpoint_dir: str, expected: Any = None) -> Any:
  """Restores the model params (numpy leaves) from an orbax checkpoint directory.

  Args:
    checkpoint_dir: a CheckpointManager root (latest step, item 'params'), one of its step
      folders, or a plain PyTree checkpoint of `params` or of {'params': params}.
    expected: if given, the params tree of the model that will use them (arrays or
      jax.ShapeDtypeStructs, e.g. `trainer.abstract_params(model, config)`); the stored tree is
      checked against it before anything is read.

  Raises:
    errors.MissingInputError: `checkpoint_dir` or its step's 'params' item does not exist.
    errors.InvalidInputError: not an orbax checkpoint; or, with `expected`, stored params that
      do not fit, each missing, unexpected or differently shaped one named with both shapes
      (`checkpoint.check_tree_fits`).
  """
  path, _ = checkpoint_params_dir(checkpoint_dir)
  path = epath.Path(os.path.abspath(path))
  # The item's own handler: a Checkpointer would also look for (and warn about) the
  # step-level _CHECKPOINT_METADATA, which an item folder of a training step does not hold.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    try:
      metadata = handler.metadata(path)
    except (FileNotFoundError, ValueError) as e:
      raise errors.InvalidInputError(
          f"{checkpoint_dir!r} is not an orbax params checkpoint: {e}{_workdir_hint(checkpoint_dir)}"
      ) from e
    tree = getattr(metadata, "tree", metadata)
    if expected is not None:
      checkpoint_lib.check_tree_fits(expected, _unwrap_params(tree), f"checkpoint {path}")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    try:
      restored = handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except (FileNotFoundError, ValueError) as e:
      raise errors.InvalidInputError(
          f"{checkpoint_dir!r} is not an orbax params checkpoint: {e}{_workdir_hint(checkpoint_dir)}"
      ) from e
  finally:
    handler.close()
  return _unwrap_params(restored)
