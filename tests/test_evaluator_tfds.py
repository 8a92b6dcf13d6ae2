"""COCO evaluation on the TFDS source (coco/2017 mocked by tfds_coco_mock, no downloads): the
ground truth built from TFDS records against hand-computed boxes and COCO ids, perfect
predictions through `evaluate`, eval.py end to end (metrics and --predict_val), and a data dir
without the dataset."""
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import tiny
from ddetr_jax import data as data_lib
from ddetr_jax import evaluator
from tests import oracle_model
from tests import tfds_coco_mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# COCO 2017's 80 category ids: 1..90 without the 10 ids no annotation uses.
COCO_IDS = sorted(set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
NUM_CLASSES = {"raw": 91, "contiguous": 80}


def _tfds_config(category_ids: str = "raw"):
  config = tiny.get_config()
  config.data.source = "tfds"
  config.data.category_ids = category_ids
  config.model.num_classes = NUM_CLASSES[category_ids]
  return config


@pytest.mark.parametrize("category_ids", ["raw", "contiguous"])
def test_ground_truth_from_tfds_records(category_ids):
  """Image ids and sizes, boxes in original-pixel xywh, COCO category ids, crowd flags."""
  with tfds_coco_mock.mock_coco():
    gt = data_lib.coco_ground_truth(_tfds_config(category_ids).data)
  assert sorted(gt.getCatIds()) == COCO_IDS
  assert sorted(gt.getImgIds()) == sorted(tfds_coco_mock.EXPECTED_GT)
  for image_id, (height, width, objects) in tfds_coco_mock.EXPECTED_GT.items():
    image = gt.imgs[image_id]
    assert (image["height"], image["width"]) == (height, width), image_id
    anns = gt.imgToAnns.get(image_id, [])
    assert [(a["category_id"], a["iscrowd"]) for a in anns] == [(c, z) for c, _, z in objects]
    np.testing.assert_allclose([a["bbox"] for a in anns], [b for _, b, _ in objects],
                               atol=1e-4, err_msg=str(image_id))
  perfect = [{"image_id": image_id, "category_id": c, "bbox": b, "score": 0.9}
             for image_id, (_, _, objects) in tfds_coco_mock.EXPECTED_GT.items()
             for c, b, crowd in objects if not crowd]
  metrics = evaluator.coco_metrics(gt, perfect)
  assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)


@pytest.mark.parametrize("category_ids,use_mesh", [("raw", True), ("contiguous", False)])
def test_evaluate_perfect_predictions_on_tfds(tmp_path, category_ids, use_mesh):
  """The batch's own targets as predictions: AP 1 and every hand-computed GT box in the results
  with its COCO id, so labels and boxes of the TFDS path map back correctly."""
  config = _tfds_config(category_ids)
  with tfds_coco_mock.mock_coco():
    batches = list(data_lib.make_eval_batches(config))
    assert len(batches) == 1 and batches[0]["valid"].sum() == len(tfds_coco_mock.VALIDATION)
    batch = batches[0]
    params = oracle_model.perfect_predictions(batch, config.model.num_queries,
                                              config.model.num_classes)
    mesh = Mesh(np.array(jax.devices()), ("data",)) if use_mesh else None
    metrics = evaluator.evaluate(oracle_model.OracleModel(), params, config, mesh=mesh,
                                 workdir=str(tmp_path))
  for name in ("AP", "AP50", "AP75", "AR100"):
    assert metrics[name] == pytest.approx(1.0, abs=1e-6), name
  assert metrics["num_images"] == len(tfds_coco_mock.VALIDATION)
  results = json.loads((tmp_path / "coco_results.json").read_text())
  assert {d["category_id"] for d in results} <= set(COCO_IDS)
  for image_id, (_, _, objects) in tfds_coco_mock.EXPECTED_GT.items():
    for category, bbox, crowd in objects:
      found = [d for d in results if d["image_id"] == image_id and d["score"] > 0.99
               and d["category_id"] == category and np.allclose(d["bbox"], bbox, atol=0.01)]
      assert len(found) == (0 if crowd else 1), (image_id, category, bbox)


def test_missing_tfds_dataset_names_it_and_the_data_dir(tmp_path, monkeypatch):
  """No mock: the data dir has no coco/2017; nothing is downloaded, the error says what is missing."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # TFDS's mkdtemp() for a missing info
  config = _tfds_config()
  config.data.tfds_data_dir = str(tmp_path / "tfds_data")
  with pytest.raises(FileNotFoundError) as error:
    evaluator.evaluate(oracle_model.OracleModel(), {}, config)
  message = str(error.value)
  assert "'coco/2017'" in message and repr(str(tmp_path / "tfds_data")) in message
  assert "tfds build" in message
  assert not os.path.exists(tmp_path / "tfds_data" / "downloads")


@pytest.fixture(scope="module")
def eval_cli(tmp_path_factory):
  """A random tiny checkpoint (1+1 layers, 91 classes) and the eval.py command on mocked TFDS."""
  from ddetr_jax import convert  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models import build_model  # pylint: disable=g-import-not-at-top
  tmp_path = tmp_path_factory.mktemp("eval_tfds")
  config = tiny.get_config("single_scale")
  config.model.enc_layers = config.model.dec_layers = 1
  config.model.num_classes = 91
  model = build_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                               jnp.zeros((1, 64, 64), bool))["params"]
  convert.save_params(params, str(tmp_path / "ckpt"))
  command = [sys.executable, "-m", "tests.eval_tfds_worker",
             "--config", os.path.join(ROOT, "configs", "tiny.py") + ":single_scale",
             "--config.model.enc_layers=1", "--config.model.dec_layers=1",
             "--config.model.num_classes=91", "--config.data.source=tfds",
             "--checkpoint", str(tmp_path / "ckpt"), "--workdir", str(tmp_path / "work")]
  return command, tmp_path


def _run(command):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return run


def test_eval_cli_on_tfds(eval_cli):
  """eval.py on the mocked validation split: 12 metrics printed and written, every image once."""
  command, tmp_path = eval_cli
  run = _run(command)
  metrics = json.loads((tmp_path / "work" / "coco_metrics.json").read_text())
  assert set(metrics) == set(evaluator.METRIC_NAMES) | {"num_images", "step"}
  assert metrics["step"] is None  # a converted-style checkpoint: no training step
  for name in evaluator.METRIC_NAMES:
    assert f"{name:>6s} {metrics[name]:.4f}" in run.stdout, name
  assert metrics["num_images"] == len(tfds_coco_mock.VALIDATION)
  assert f"evaluated {len(tfds_coco_mock.VALIDATION)} images" in run.stdout
  results = json.loads((tmp_path / "work" / "coco_results.json").read_text())
  assert results and {d["image_id"] for d in results} == set(tfds_coco_mock.EXPECTED_GT)
  assert {d["category_id"] for d in results} <= set(COCO_IDS)


def test_eval_cli_predict_val_on_tfds(eval_cli):
  """--predict_val 2 on TFDS: the first two records' images are exported and predicted."""
  command, tmp_path = eval_cli
  out = tmp_path / "pred"
  _run(command + ["--predict_val", "2", "--out", str(out)])
  summary = json.loads((out / "detections.json").read_text())
  exported = [str(out / "validation_images" / n) for n in ("000000000285.jpg", "000000000139.jpg")]
  assert [e["file"] for e in summary["images"]] == exported
  assert [(e["height"], e["width"]) for e in summary["images"]] == [(48, 64), (80, 40)]
  assert all(os.path.isfile(e["output"]) and len(e["attention"]) == 1 for e in summary["images"])
