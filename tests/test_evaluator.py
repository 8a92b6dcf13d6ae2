"""COCO evaluation: metrics against pycocotools and hand-computed cases, label -> category ids,
an end-to-end `evaluate` on the tiny shapes split with perfect predictions, and checkpoints."""
import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs import tiny
from ddetr_jax import data as data_lib
from ddetr_jax import errors
from ddetr_jax import evaluator
from tests import oracle_model


def _gt_coco(images, annotations, category_ids=(3, 7, 12)) -> COCO:
  coco = COCO()
  coco.dataset = {
      "images": images,
      "annotations": [dict(a, id=i + 1, area=a["bbox"][2] * a["bbox"][3], iscrowd=0)
                      for i, a in enumerate(annotations)],
      "categories": [{"id": c, "name": f"c{c}"} for c in category_ids]}
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _small_medium_large():
  """Three images, one object each: small (20x20), medium (50x60), large (150x100)."""
  images = [{"id": i, "height": 300, "width": 400} for i in (5, 9, 11)]
  annotations = [{"image_id": 5, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 20.0]},
                 {"image_id": 9, "category_id": 7, "bbox": [100.0, 50.0, 50.0, 60.0]},
                 {"image_id": 11, "category_id": 12, "bbox": [30.0, 40.0, 150.0, 100.0]}]
  return images, annotations


def test_perfect_predictions_give_one():
  images, annotations = _small_medium_large()
  gt = _gt_coco(images, annotations)
  detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                 "score": 0.9} for a in annotations]
  metrics = evaluator.coco_metrics(gt, detections)
  assert list(metrics) == list(evaluator.METRIC_NAMES)
  for name, value in metrics.items():
    assert value == pytest.approx(1.0), name


def test_shifted_box_hand_computed():
  # GT 100x100 (large); the detection shifted right by 23 px has IoU 77 / 123 = 0.626, so it
  # matches at the IoU thresholds 0.50, 0.55, 0.60 out of 0.50:0.05:0.95 -> AP = 3 / 10.
  gt = _gt_coco([{"id": 1, "height": 200, "width": 200}],
                [{"image_id": 1, "category_id": 7, "bbox": [10.0, 10.0, 100.0, 100.0]}])
  metrics = evaluator.coco_metrics(
      gt, [{"image_id": 1, "category_id": 7, "bbox": [33.0, 10.0, 100.0, 100.0], "score": 0.5}])
  expected = {"AP": 0.3, "AP50": 1.0, "AP75": 0.0, "APs": -1.0, "APm": -1.0, "APl": 0.3,
              "AR1": 0.3, "AR10": 0.3, "AR100": 0.3, "ARs": -1.0, "ARm": -1.0, "ARl": 0.3}
  for name, value in expected.items():
    assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_shifted_boxes_match_pycocotools():
  rng = np.random.default_rng(1)
  images = [{"id": i, "height": 480, "width": 640} for i in range(1, 6)]
  annotations = []
  for image in images:
    for _ in range(3):
      w, h = rng.uniform(10, 200, 2)
      x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
      annotations.append({"image_id": image["id"], "category_id": int(rng.choice([3, 7, 12])),
                          "bbox": [float(x), float(y), float(w), float(h)]})
  gt = _gt_coco(images, annotations)
  detections = []
  for a in annotations:
    x, y, w, h = a["bbox"]
    dx, dy = rng.normal(0, 0.15 * w), rng.normal(0, 0.15 * h)
    detections.append({"image_id": a["image_id"], "category_id": a["category_id"],
                       "bbox": [x + dx, y + dy, w, h], "score": float(rng.uniform(0.1, 1))})
  metrics = evaluator.coco_metrics(gt, detections)
  assert metrics["AP"] < 0.9  # the shift does cost AP
  with contextlib.redirect_stdout(io.StringIO()):
    reference = COCOeval(gt, gt.loadRes(detections), "bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
  np.testing.assert_allclose([metrics[n] for n in evaluator.METRIC_NAMES], reference.stats,
                             rtol=0, atol=0)
  perfect = [dict(d, bbox=a["bbox"]) for d, a in zip(detections, annotations)]
  assert evaluator.coco_metrics(gt, perfect)["AP"] == pytest.approx(1.0)


def test_no_detections_and_unknown_image():
  gt = _gt_coco(*_small_medium_large())
  assert evaluator.coco_metrics(gt, []) == {n: 0.0 for n in evaluator.METRIC_NAMES}
  with pytest.raises(ValueError, match="image ids not in the ground truth"):
    evaluator.coco_metrics(gt, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1],
                                 "score": 1.0}])


def _coco_folder_config(tmp_path, category_ids: str):
  images, annotations = _small_medium_large()
  for image in images:
    image["file_name"] = f"{image['id']}.jpg"
  ann_file = tmp_path / "val.json"
  ann_file.write_text(json.dumps({
      "images": images, "annotations": [dict(a, id=i + 1, area=1.0, iscrowd=0)
                                        for i, a in enumerate(annotations)],
      "categories": [{"id": c, "name": f"c{c}"} for c in (3, 7, 12)]}))
  config = tiny.get_config()
  config.data.source = "coco_folder"
  config.data.val_ann_file = str(ann_file)
  config.data.val_image_dir = str(tmp_path)
  config.data.category_ids = category_ids
  return config


@pytest.mark.parametrize("category_ids,labels,expected", [
    ("raw", [3, 7, 12, 5, 0], [3, 7, 12, None, None]),
    ("contiguous", [0, 1, 2, 3, 4], [3, 7, 12, None, None]),
])
def test_labels_map_to_dataset_category_ids(tmp_path, category_ids, labels, expected):
  config = _coco_folder_config(tmp_path, category_ids)
  categories = data_lib.categories(config.data)
  table = evaluator.label_to_category_table(categories.label_to_category_id, 13)
  boxes = np.tile(np.array([10.0, 20.0, 40.0, 60.0]), (1, len(labels), 1))  # [1, K, 4] xyxy
  scores = np.linspace(0.9, 0.5, len(labels))[None]
  detections = evaluator.coco_detections(np.array([11]), scores, np.array([labels]), boxes, table)
  kept = [e for e in expected if e is not None]
  assert [d["category_id"] for d in detections] == kept
  assert all(d["image_id"] == 11 and d["bbox"] == [10.0, 20.0, 30.0, 40.0] for d in detections)


@pytest.mark.parametrize("category_ids,use_mesh", [("raw", True), ("contiguous", False)])
def test_evaluate_perfect_predictions_end_to_end(tmp_path, category_ids, use_mesh):
  config = tiny.get_config()
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.category_ids = category_ids
  config.data.shapes.num_val = 6  # the one batch of 8 ends with 2 filler images
  config.data.shapes.min_objects = 1
  batches = list(data_lib.make_eval_batches(config))
  assert len(batches) == 1
  batch = batches[0]
  assert len(batch["box_mask"]) == 8
  assert batch["box_mask"].shape[1] <= config.model.num_queries and batch["valid"].sum() == 6
  params = oracle_model.perfect_predictions(batch, config.model.num_queries,
                                            config.model.num_classes)
  mesh = Mesh(np.array(jax.devices()), ("data",)) if use_mesh else None
  metrics = evaluator.evaluate(oracle_model.OracleModel(), params, config, mesh=mesh,
                               workdir=str(tmp_path / "work"), step=7)
  for name in ("AP", "AP50", "AP75", "AR100"):
    assert metrics[name] == pytest.approx(1.0, abs=1e-6), name
  written = json.loads((tmp_path / "work" / "coco_metrics.json").read_text())
  assert written == metrics and written["step"] == 7
  assert set(written) == set(evaluator.METRIC_NAMES) | {"num_images", "step"}
  assert written["num_images"] == 6
  results = json.loads((tmp_path / "work" / "coco_results.json").read_text())
  gt = data_lib.coco_ground_truth(config.data)
  assert {d["image_id"] for d in results} <= set(gt.getImgIds())
  assert {d["category_id"] for d in results} <= set(gt.getCatIds())
  # Every ground-truth box appears (in original pixels) among the detections of its image.
  for ann in gt.dataset["annotations"]:
    found = [d for d in results if d["image_id"] == ann["image_id"]
             and d["category_id"] == ann["category_id"]
             and np.allclose(d["bbox"], ann["bbox"], atol=0.01)]
    assert found, ann


def test_evaluate_rejects_wrong_image_count(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.data.cache_dir = str(tmp_path / "cache")
  real = data_lib.make_eval_batches

  def one_image_short(*args, **kwargs):
    batches = real(*args, **kwargs)
    batches.num_records += 1
    return batches

  monkeypatch.setattr(data_lib, "make_eval_batches", one_image_short)
  q, c = config.model.num_queries, config.model.num_classes
  params = {"logits": jnp.zeros((8, q, c)), "boxes": jnp.full((8, q, 4), 0.5)}
  with pytest.raises(RuntimeError, match="evaluated 8 images"):
    evaluator.evaluate(oracle_model.OracleModel(), params, config)


def test_evaluate_on_a_split_where_no_image_decodes_is_an_error(tmp_path):
  # It printed all-zero metrics and exited 0; one undecodable image among good ones only warns.
  config = _coco_folder_config(tmp_path, "contiguous")
  images = json.loads((tmp_path / "val.json").read_text())["images"]
  for image in images:
    (tmp_path / image["file_name"]).write_bytes(b"not an image")
  q, c = config.model.num_queries, config.model.num_classes
  params = {"logits": jnp.zeros((8, q, c)), "boxes": jnp.full((8, q, 4), 0.5)}
  with pytest.raises(data_lib.CorruptImageError,
                     match=rf"none of the {len(images)} images of the 'val' split could be "
                           rf"decoded, e.g. .*{images[0]['file_name']}"):
    evaluator.evaluate(oracle_model.OracleModel(), params, config, workdir=str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for image in images[1:]:
    Image.new("RGB", (image["width"], image["height"])).save(tmp_path / image["file_name"])
  metrics = evaluator.evaluate(oracle_model.OracleModel(), params, config)
  assert metrics["num_images"] == len(images) - 1


def test_load_params_plain_and_manager(tmp_path):
  params = {"backbone": {"conv1": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
            "query_embed": np.ones((4, 2), np.float32)}
  ocp.PyTreeCheckpointer().save(str(tmp_path / "plain"), params)
  ocp.PyTreeCheckpointer().save(str(tmp_path / "wrapped"), {"params": params})
  with ocp.CheckpointManager(str(tmp_path / "manager")) as manager:
    for step in (2, 10):
      scaled = jax.tree.map(lambda x: x * step, params)
      manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(scaled),
                                                 opt_state=ocp.args.StandardSave({"mu": 1.0})))
    manager.wait_until_finished()
  for name, factor in (("plain", 1), ("wrapped", 1), ("manager", 10), ("manager/2", 2)):
    restored = evaluator.load_params(str(tmp_path / name))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b * factor), restored, params)
  assert evaluator.checkpoint_params_dir(str(tmp_path / "manager"))[1] == 10
  assert evaluator.checkpoint_params_dir(str(tmp_path / "manager" / "2") + "/")[1] == 2
  assert evaluator.checkpoint_params_dir(str(tmp_path / "wrapped"))[1] is None
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    evaluator.load_params(str(tmp_path / "no_such_dir"))


def test_load_params_on_a_training_workdir_points_to_its_checkpoints(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "metrics.jsonl").write_text("")
  with pytest.raises(errors.InvalidInputError,
                     match=rf"did you mean '{tmp_path}/checkpoints' \(a training run's"):
    evaluator.load_params(str(tmp_path))


@pytest.mark.parametrize("name", ["weights.pth", "model_best.pth.tar"])
def test_load_params_on_a_file_says_it_is_a_file(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(b"not a folder")
  with pytest.raises(errors.InvalidInputError, match=rf"{name}' is a file, not an orbax .*"
                                                     r"--torch_checkpoint"):
    evaluator.load_params(str(path))


def test_load_params_names_every_parameter_that_does_not_fit_the_model(tmp_path):
  params = {"class_embed": {"kernel": np.zeros((4, 5), np.float32)},
            "query_embed": np.ones((16, 8), np.float32),
            "old_head": {"bias": np.zeros((3,), np.float32)}}
  path = str(tmp_path / "ckpt")
  ocp.PyTreeCheckpointer().save(path, {"params": params})  # the layout of convert.save_params
  expected = {"class_embed": {"kernel": jax.ShapeDtypeStruct((4, 7), jnp.float32)},
              "query_embed": jax.ShapeDtypeStruct((16, 8), jnp.float32),
              "new_head": {"bias": jax.ShapeDtypeStruct((3,), jnp.float32)}}
  with pytest.raises(errors.InvalidInputError) as error:
    evaluator.load_params(path, expected=expected)
  message = str(error.value)
  assert path in message
  assert "class_embed/kernel checkpoint (4, 5) vs model (4, 7)" in message
  assert "missing from the checkpoint: ['new_head/bias']" in message
  assert "not in the model: ['old_head/bias']" in message
  assert "query_embed" not in message
  fitting = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  restored = evaluator.load_params(path, expected=fitting)
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_eval_cli_evaluates_and_predicts(tmp_path):
  """eval.py end to end on the tiny shapes split: a converted-style checkpoint, COCO metrics
  written to the workdir, then --predict_val pictures."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from ddetr_jax import convert  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models import build_model  # pylint: disable=g-import-not-at-top
  overrides = ["--config.model.enc_layers=1", "--config.model.dec_layers=1",
               f"--config.data.cache_dir={tmp_path / 'cache'}"]
  config = tiny.get_config("single_scale")
  config.model.enc_layers = config.model.dec_layers = 1
  model = build_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                               jnp.zeros((1, 64, 64), bool))["params"]
  convert.save_params(params, str(tmp_path / "ckpt"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  base = [sys.executable, os.path.join(root, "eval.py"), "--config",
          os.path.join(root, "configs", "tiny.py") + ":single_scale", *overrides,
          "--checkpoint", str(tmp_path / "ckpt"), "--workdir", str(tmp_path / "work")]
  run = subprocess.run(base, env=env, cwd=root, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  metrics = json.loads((tmp_path / "work" / "coco_metrics.json").read_text())
  assert set(metrics) == set(evaluator.METRIC_NAMES) | {"num_images", "step"}
  assert metrics["step"] is None  # converted weights: no training step to record.
  assert metrics["num_images"] == config.data.shapes.num_val
  assert f"AR100 {metrics['AR100']:.4f}" in run.stdout
  results = json.loads((tmp_path / "work" / "coco_results.json").read_text())
  assert len({d["image_id"] for d in results}) <= config.data.shapes.num_val
  run = subprocess.run(base + ["--predict_val", "2", "--out", str(tmp_path / "pred")], env=env,
                       cwd=root, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  summary = json.loads((tmp_path / "pred" / "detections.json").read_text())
  assert len(summary["images"]) == 2 and all(len(e["attention"]) == 1 for e in summary["images"])
