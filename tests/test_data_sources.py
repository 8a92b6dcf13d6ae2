"""Sources: the shapes generator, COCO folders (incl. bad input), TFDS through mock_data."""
import filecmp
import json
import os
import tempfile

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from ddetr_jax import data
from ddetr_jax import errors
from ddetr_jax.data import coco_folder
from ddetr_jax.data import shapes
from tests import tfds_coco_mock

_SPEC = shapes.ShapesSpec(num_train=12, num_val=4, image_size=64, seed=3, min_objects=0,
                          max_objects=3)


def test_shapes_generator_is_deterministic(tmp_path):
  first = shapes.generate(_SPEC, str(tmp_path / "a"))
  second = shapes.generate(_SPEC, str(tmp_path / "b"))
  other = shapes.generate(shapes.ShapesSpec(**{**_SPEC.__dict__, "seed": 4}), str(tmp_path / "c"))
  names = sorted(os.listdir(os.path.join(first, "train")))
  assert len(names) == 12
  match, mismatch, errors = filecmp.cmpfiles(first, second, [
      "annotations/train.json", "annotations/val.json"] + [f"train/{n}" for n in names],
                                             shallow=False)
  assert not mismatch and not errors
  assert not filecmp.cmp(os.path.join(first, "train", names[0]),
                         os.path.join(other, "train", names[0]), shallow=False)


def test_shapes_annotations_are_valid_coco(tmp_path):
  root = shapes.generate(_SPEC, str(tmp_path / "a"))
  ann = json.load(open(os.path.join(root, "annotations", "train.json")))
  sizes = {im["id"]: (im["width"], im["height"]) for im in ann["images"]}
  for im in ann["images"]:
    with Image.open(os.path.join(root, "train", im["file_name"])) as pil:
      assert pil.size == (im["width"], im["height"])
  counts = {im_id: 0 for im_id in sizes}
  for a in ann["annotations"]:
    x, y, w, h = a["bbox"]
    width, height = sizes[a["image_id"]]
    assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width + 0.01
    assert y + h <= height + 0.01 and 0 < a["area"] <= w * h + 0.01
    assert a["category_id"] in (1, 2, 3, 4)
    counts[a["image_id"]] += 1
  assert max(counts.values()) <= 3 and 0 in counts.values()


def test_shapes_dataset_dir_caches(tmp_path):
  config = tiny.get_config()
  config.data.cache_dir = str(tmp_path)
  root = shapes.dataset_dir(config.data)
  stamp = os.path.getmtime(os.path.join(root, "annotations", "val.json"))
  assert shapes.dataset_dir(config.data) == root
  assert os.path.getmtime(os.path.join(root, "annotations", "val.json")) == stamp
  assert [p for p in os.listdir(tmp_path)] == [os.path.basename(root)]


def _write_folder(tmp_path, annotations, images=None, categories=None):
  """A 2-image COCO folder; returns (ann_file, image_dir)."""
  image_dir = tmp_path / "images"
  image_dir.mkdir(exist_ok=True)
  images = images or [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
                      {"id": 20, "file_name": "b.png", "width": 20, "height": 20}]
  for im in images:
    Image.new("RGB", (im["width"], im["height"]), (200, 10, 10)).save(image_dir / im["file_name"])
  categories = categories or [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]
  ann_file = tmp_path / "ann.json"
  ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                  "categories": categories}))
  return str(ann_file), str(image_dir)


_ANNS = [
    {"id": 1, "image_id": 10, "category_id": 17, "bbox": [1, 2, 10, 5], "iscrowd": 0},
    {"id": 2, "image_id": 10, "category_id": 3, "bbox": [5, 5, 4, 4], "iscrowd": 1},
    {"id": 3, "image_id": 10, "category_id": 3, "bbox": [5, 5, -4, 4]},         # negative width
    {"id": 4, "image_id": 10, "category_id": 3, "bbox": [50, 5, 4, 4]},         # outside image
    {"id": 5, "image_id": 20, "category_id": 3, "bbox": [float("nan"), 0, 1, 1]},  # non-finite
    {"id": 6, "image_id": 20, "category_id": 3, "bbox": [0, 0, 20, 20]},
]


def test_coco_folder_records_and_category_ids(tmp_path):
  ann_file, image_dir = _write_folder(tmp_path, _ANNS)
  raw = coco_folder.CocoFolderSource(ann_file, image_dir, "raw")
  assert len(raw) == 2 and raw.num_dropped_annotations == 3
  record = raw[0]
  assert record["image"].shape == (30, 40, 3) and record["image"].dtype == np.uint8
  np.testing.assert_allclose(record["boxes"], [[1, 2, 11, 7], [5, 5, 9, 9]])
  assert record["labels"].tolist() == [17, 3] and record["is_crowd"].tolist() == [False, True]
  assert record["image_id"] == 10 and record["orig_size"].tolist() == [30, 40]
  contiguous = coco_folder.CocoFolderSource(ann_file, image_dir, "contiguous")
  assert contiguous[0]["labels"].tolist() == [1, 0]
  assert contiguous.label_to_category == {0: 3, 1: 17}
  assert contiguous[1]["labels"].tolist() == [0]


def _folder_config(ann_file, image_dir, category_ids="raw", num_classes=20):
  config = tiny.get_config()
  d = config.data
  d.source = "coco_folder"
  d.train_ann_file = d.val_ann_file = ann_file
  d.train_image_dir = d.val_image_dir = image_dir
  d.category_ids = category_ids
  d.buckets = (64,)
  d.train_scales = d.crop_resize_scales = (32,)
  d.crop_min_size, d.crop_max_size = 16, 32
  d.val_scale = 32
  d.train_max_size = d.val_max_size = 64
  config.model.num_classes = num_classes
  config.train.global_batch_size = 2
  config.eval.batch_size = 2
  return config


def test_num_classes_checked_against_the_data(tmp_path):
  ann_file, image_dir = _write_folder(tmp_path, _ANNS)
  with pytest.raises(ValueError, match=r"category id 17 .*ann\.json.*num_classes"):
    data.make_train_iterator(_folder_config(ann_file, image_dir, "raw", num_classes=17))
  categories = data.categories(_folder_config(ann_file, image_dir, "contiguous").data)
  assert categories.names == ("cat", "dog")
  assert categories.category_ids(np.array([[1, 0]])).tolist() == [[17, 3]]
  assert data.category_names(_folder_config(ann_file, image_dir).data)[17] == "dog"


@pytest.mark.parametrize("text, match", [
    ("{not json", r"malformed COCO annotation json .*ann\.json"),
    (json.dumps({"images": [], "categories": []}), r"ann\.json.*missing list 'annotations'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}],
                 "annotations": [{"id": 9, "image_id": 1, "category_id": 1}]}),
     r"ann\.json.*annotations\[0\] \(id 9\) has no 'bbox'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}],
                 "annotations": [{"id": 9, "image_id": 2, "category_id": 1,
                                  "bbox": [0, 0, 1, 1]}]}),
     r"annotations\[0\] \(id 9\) refers to image_id 2"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"},
                            {"id": 1, "file_name": "c.png"}],
                 "categories": [{"id": 1}], "annotations": []}),
     r"ann\.json.*images\[0\] and images\[2\] have the same id 1"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                 "categories": [{"id": 4, "name": "a"}, {"id": 4, "name": "b"}], "annotations": []}),
     r"categories\[0\] and categories\[1\] have the same id 4"),
])
def test_malformed_annotation_json_names_file_and_record(tmp_path, text, match):
  (tmp_path / "images").mkdir()
  (tmp_path / "ann.json").write_text(text)
  with pytest.raises(ValueError, match=match):
    coco_folder.CocoFolderSource(str(tmp_path / "ann.json"), str(tmp_path / "images"))


def test_reading_a_coco_folder_prints_nothing_on_stdout(tmp_path, capsys):
  ann_file, image_dir = _write_folder(tmp_path, _ANNS)
  source = coco_folder.CocoFolderSource(ann_file, image_dir)
  gt = data.coco_ground_truth(_folder_config(ann_file, image_dir).data, "val")
  assert len(source) == 2 and len(gt.getImgIds()) == 2
  assert capsys.readouterr().out == ""


def test_missing_image_is_a_user_error_at_start_naming_the_files(tmp_path):
  ann_file, image_dir = _write_folder(tmp_path, _ANNS)
  os.remove(os.path.join(image_dir, "b.png"))
  with pytest.raises(errors.MissingInputError,
                     match=r"1 of the 2 image files that .*ann.* names are not in the image "
                           r"directory .*: \['b\.png'\]"):
    data.make_train_iterator(_folder_config(ann_file, image_dir))


def test_missing_validation_image_is_reported_when_training_starts(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from ddetr_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  train_dir = tmp_path / "train"
  train_dir.mkdir()
  train_ann, train_images = _write_folder(train_dir, _ANNS)
  val_ann, val_images = _write_folder(tmp_path, _ANNS)
  os.remove(os.path.join(val_images, "a.png"))
  config = _folder_config(train_ann, train_images)
  config.data.val_ann_file, config.data.val_image_dir = val_ann, val_images
  config.train.eval_every = -1  # only at the end, after all the training.
  with pytest.raises(errors.MissingInputError, match=r"1 of the 2 image files .*\['a\.png'\]"):
    trainer.train_and_evaluate(config, str(tmp_path / "work"),
                               mesh=sharding.make_mesh(jax.devices()[:1]))
  assert not os.path.exists(tmp_path / "work" / "checkpoints")  # stopped before any training.


def test_image_removed_during_a_run_raises_with_file_and_record(tmp_path):
  ann_file, image_dir = _write_folder(tmp_path, _ANNS)
  source = coco_folder.CocoFolderSource(ann_file, image_dir)
  os.remove(os.path.join(image_dir, "b.png"))
  with pytest.raises(errors.MissingInputError, match=r"b\.png.*record 1 \(image_id 20\)"):
    source[1]


def test_split_without_images_is_an_error_naming_the_file(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "ann.json").write_text(json.dumps({"images": [], "annotations": [],
                                                 "categories": [{"id": 3, "name": "cat"}]}))
  config = _folder_config(str(tmp_path / "ann.json"), str(tmp_path / "images"))
  with pytest.raises(errors.InvalidInputError, match=r"the train split of .*ann\.json' holds no images"):
    data.make_train_iterator(config)
  # Evaluating nothing is refused too (it printed 'evaluated 0 images' and all-zero metrics).
  with pytest.raises(errors.InvalidInputError, match=r"the val split of .*ann\.json' holds no images"):
    data.make_eval_batches(config)


def test_no_decodable_training_image_is_an_error_counting_images_not_reads(tmp_path):
  images = [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 20} for i in range(1, 4)]
  anns = [{"id": i, "image_id": i, "category_id": 3, "bbox": [1, 1, 5, 5]} for i in range(1, 4)]
  ann_file, image_dir = _write_folder(tmp_path, anns, images=images)
  for i in range(1, 4):
    with open(os.path.join(image_dir, f"{i}.png"), "r+b") as f:
      f.truncate(60)
  iterator = data.make_train_iterator(_folder_config(ann_file, image_dir))
  # The loop cycles over the 3 images; the error counts the 3, not the 201 attempts.
  with pytest.raises(data.CorruptImageError,
                     match=r"no training image could be decoded in 201 reads in a row \(3 different "
                           r"images failed\), e\.g\. .*\.png"):
    next(iterator)


def test_corrupt_image_is_skipped_counted_or_raises_when_strict(tmp_path):
  images = [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 20} for i in range(1, 5)]
  anns = [{"id": i, "image_id": i, "category_id": 3, "bbox": [1, 1, 5, 5]} for i in range(1, 5)]
  ann_file, image_dir = _write_folder(tmp_path, anns, images=images)
  with open(os.path.join(image_dir, "3.png"), "r+b") as f:
    f.truncate(60)  # header only: PIL opens it but cannot decode it.
  config = _folder_config(ann_file, image_dir)
  iterator = data.make_train_iterator(config)
  ids = [next(iterator)["image_id"].tolist() for _ in range(6)]
  assert all(len(b) == 2 for b in ids)                        # batches stay full.
  assert 3 not in sum(ids, [])
  # 12 good images = 4 epochs of 3; the bad one came before the last good one 3 or 4 times.
  assert iterator.stats["num_skipped"] in (3, 4)
  eval_batches = data.make_eval_batches(config)
  batches = list(eval_batches)
  valid_ids = sorted(i for b in batches for i, v in zip(b["image_id"], b["valid"]) if v)
  assert valid_ids == [1, 2, 4] and eval_batches.stats["num_skipped"] == 1
  config.data.strict = True
  with pytest.raises(data.CorruptImageError, match=r"3\.png.*image_id 3"):
    strict_iterator = data.make_train_iterator(config)
    for _ in range(6):
      next(strict_iterator)


def test_eval_batches_with_ground_truth_give_perfect_ap(tmp_path):
  """Eval covers each image once and labels map back to the dataset's category ids."""
  from pycocotools.cocoeval import COCOeval
  images = [{"id": 100 + i, "file_name": f"{i}.png", "width": 24 + 4 * i, "height": 30}
            for i in range(5)]
  anns = [{"id": j + 1, "image_id": 100 + j % 5, "category_id": (3, 17)[j % 2],
           "bbox": [2 + j, 3, 10, 8 + j], "area": 80.0, "iscrowd": 0} for j in range(9)]
  ann_file, image_dir = _write_folder(tmp_path, anns, images=images)
  config = _folder_config(ann_file, image_dir, "contiguous")
  config.eval.batch_size = 4
  gt = data.coco_ground_truth(config.data, "val")
  categories = data.categories(config.data)
  batches = list(data.make_eval_batches(config))
  assert len(batches) == 2
  results = []
  for batch in batches:
    for i in np.nonzero(batch["valid"])[0]:
      height, width = batch["orig_size"][i]
      for box, label in zip(batch["boxes"][i][batch["box_mask"][i]],
                            batch["labels"][i][batch["box_mask"][i]]):
        cx, cy, w, h = box * [width, height, width, height]
        results.append({"image_id": int(batch["image_id"][i]),
                        "category_id": int(categories.category_ids(label)),
                        "bbox": [cx - w / 2, cy - h / 2, w, h], "score": 1.0})
  assert sorted(i for b in batches for i, v in zip(b["image_id"], b["valid"]) if v) == list(
      range(100, 105))
  evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  assert evaluator.stats[0] > 0.99


def test_tfds_source_through_mock_data(monkeypatch, tmp_path):
  import tensorflow_datasets as tfds
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # TFDS's mkdtemp() under mock_data
  examples = [
      {"image": np.full((20, 40, 3), 9, np.uint8), "image/id": np.int64(7),
       "image/filename": "x.jpg",
       "objects": {"bbox": np.array([[0.1, 0.25, 0.6, 0.75], [0, 0, 1, np.nan]], np.float32),
                   "label": np.array([0, 79]), "is_crowd": np.array([False, False]),
                   "area": np.array([10, 20]), "id": np.array([1, 2])}},
      {"image": np.full((10, 10, 3), 9, np.uint8), "image/id": np.int64(8),
       "image/filename": b"y.jpg",
       "objects": {"bbox": np.array([[0, 0, 0.5, 0.5]], np.float32), "label": np.array([11]),
                   "is_crowd": np.array([True]), "area": np.array([25]), "id": np.array([3])}},
  ]
  seen = {}

  def as_data_source(builder, split, decoders=None, **kwargs):
    del builder, decoders, kwargs
    seen["split"] = split
    return examples

  config = tiny.get_config()
  config.data.source = "tfds"
  with tfds.testing.mock_data(num_examples=2, as_data_source_fn=as_data_source):
    source = data.build_source(config.data, "val", num_classes=91)
    assert seen["split"] == "validation" and len(source) == 2
    record = source[0]
    np.testing.assert_allclose(record["boxes"], [[10, 2, 30, 12]])   # yxyx normalized -> xyxy
    assert record["labels"].tolist() == [1] and record["num_dropped_annotations"] == 1
    assert source[1]["labels"].tolist() == [13] and source[1]["is_crowd"].tolist() == [True]
    assert source.label_to_category[90] == 90
    config.data.category_ids = "contiguous"
    contiguous = data.build_source(config.data, "val")
    assert contiguous[0]["labels"].tolist() == [0] and contiguous.label_to_category[11] == 13


def test_mock_coco_leaves_no_tfds_folders_behind(tmp_path, monkeypatch):
  # TFDS makes an empty tempfile.mkdtemp("tfds") per builder when no dataset_info.json exists,
  # as under mock_data; the mock keeps them in a folder of its own and removes it.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  config = tiny.get_config()
  config.data.source = "tfds"
  with tfds_coco_mock.mock_coco():
    assert len(data.build_source(config.data, "val")) == len(tfds_coco_mock.VALIDATION)
    assert tempfile.gettempdir() != str(tmp_path)
  assert tempfile.gettempdir() == str(tmp_path)
  assert list(tmp_path.iterdir()) == []
