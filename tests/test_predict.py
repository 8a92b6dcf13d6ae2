"""Prediction on image files: image modes, any size, unreadable files, the detections json,
validation images (files, or exported from TFDS records)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from ddetr_jax import predict
from tests import tfds_coco_mock


def test_load_image_modes(tmp_path):
  gray = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7) * 3
  Image.fromarray(gray, "L").save(tmp_path / "gray.png")
  loaded = predict.load_image(str(tmp_path / "gray.png"))
  assert loaded.shape == (12, 7, 3) and loaded.dtype == np.uint8
  for channel in range(3):
    np.testing.assert_array_equal(loaded[..., channel], gray)

  rgba = np.zeros((4, 5, 4), np.uint8)
  rgba[..., :3] = (10, 200, 30)
  rgba[:, :2, 3] = 255  # opaque left part, transparent right part
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  loaded = predict.load_image(str(tmp_path / "rgba.png"))
  assert loaded.shape == (4, 5, 3)
  assert (loaded[:, :2] == (10, 200, 30)).all() and (loaded[:, 2:] == 255).all()

  deep = (np.arange(6 * 6, dtype=np.uint16).reshape(6, 6) * 1000)
  Image.fromarray(deep).save(tmp_path / "deep.png")
  loaded = predict.load_image(str(tmp_path / "deep.png"))
  assert loaded.shape == (6, 6, 3)
  assert loaded[0, 0, 0] == 0 and loaded[-1, -1, 0] == 255  # stretched to 8 bits

  palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
  palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  palette.save(tmp_path / "palette.gif")
  loaded = predict.load_image(str(tmp_path / "palette.gif"))
  assert tuple(loaded[0, 0]) == (255, 0, 0) and tuple(loaded[0, 1]) == (0, 0, 255)


def test_unreadable_images_name_the_file(tmp_path):
  (tmp_path / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
  (tmp_path / "notes.png").write_text("not an image")
  for name in ("truncated.jpg", "notes.png", "missing.jpg"):
    with pytest.raises(predict.UnreadableImageError, match=name):
      predict.load_image(str(tmp_path / name))


def test_image_batch_resizes_like_validation():
  config = tiny.get_config()  # val_scale 96, val_max_size 128, buckets (64, 128)
  batch = predict.image_batch(np.zeros((300, 500, 3), np.uint8), config)
  # Longer side capped: shorter side round(128 * 300 / 500) = 77, longer int(77 * 500 / 300).
  assert tuple(batch["size"][0]) == (77, 128)
  assert batch["images"].shape == (1, 128, 128, 3)
  assert batch["padding_mask"][0, 77:].all() and not batch["padding_mask"][0, :77].any()
  assert tuple(batch["orig_size"][0]) == (300, 500)


class _FixedModel:
  """Stands in for the detector: the same 3 queries x 2 classes for every image."""
  logits = np.array([[[4.0, -9.0], [-9.0, 1.0], [-9.0, -9.0]]], np.float32)  # scores .98, .73
  boxes = np.array([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]],
                   np.float32)

  def apply(self, variables, images, padding_mask, train=False):
    del variables, padding_mask, train
    batch = images.shape[0]
    return {"pred_logits": np.repeat(self.logits, batch, 0),
            "pred_boxes": np.repeat(self.boxes, batch, 0)}


def test_predict_files(tmp_path, caplog):
  config = tiny.get_config()
  config.model.num_classes = 2
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(images / "a.png")
  Image.fromarray(np.full((300, 200), 90, np.uint8), "L").save(images / "b.jpg")
  Image.fromarray(np.full((20, 30, 4), 90, np.uint8), "RGBA").save(images / "c.png")
  (images / "broken.jpg").write_bytes(b"garbage")
  summary = predict.predict_files(_FixedModel(), {}, config, [str(images)], str(tmp_path / "out"),
                                  threshold=0.5, num_attention=0, class_names=["cat", "dog"])
  assert [e["file"] for e in summary["skipped"]] == [str(images / "broken.jpg")]
  assert "broken.jpg" in caplog.text
  by_name = {os.path.basename(e["file"]): e for e in summary["images"]}
  assert sorted(by_name) == ["a.png", "b.jpg", "c.png"]
  for name, (height, width) in (("a.png", (40, 60)), ("b.jpg", (300, 200)), ("c.png", (20, 30))):
    entry = by_name[name]
    assert (entry["height"], entry["width"]) == (height, width)
    # Two detections above 0.5: query 0 class 0 (sigmoid 4), query 1 class 1 (sigmoid 1).
    assert [(d["name"], d["label"], d["query"]) for d in entry["detections"]] == [
        ("cat", 0, 0), ("dog", 1, 1)]
    assert entry["detections"][0]["score"] == pytest.approx(1 / (1 + np.exp(-4.0)), abs=1e-6)
    np.testing.assert_allclose(entry["detections"][0]["box_xyxy"],
                               [0.25 * width, 0.25 * height, 0.75 * width, 0.75 * height],
                               atol=1e-3)
    np.testing.assert_allclose(entry["detections"][1]["box_xyxy"],
                               [0.0, 0.0, 0.5 * width, 0.5 * height], atol=1e-3)
    with Image.open(entry["output"]) as annotated:
      assert annotated.size == (width, height) and annotated.mode == "RGB"
  assert json.loads((tmp_path / "out" / "detections.json").read_text()) == summary


def test_no_matching_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    predict.predict_files(_FixedModel(), {}, tiny.get_config(), [str(tmp_path / "nothing_here*")],
                          str(tmp_path / "out"))


def test_validation_images(tmp_path):
  config = tiny.get_config()
  config.data.cache_dir = str(tmp_path)
  paths = predict.validation_images(config, 3)
  assert len(paths) == 3 and all(os.path.isfile(p) for p in paths)
  assert predict.load_image(paths[0]).shape[2] == 3
  config.data.source = "nowhere"
  with pytest.raises(ValueError, match="'nowhere'"):
    predict.validation_images(config, 3)


def test_validation_images_of_tfds(tmp_path):
  """TFDS holds no image files: the first records' encoded images are written out unchanged."""
  config = tiny.get_config()
  config.data.source = "tfds"
  with tfds_coco_mock.mock_coco():
    with pytest.raises(ValueError, match="export_dir"):
      predict.validation_images(config, 2)
    paths = predict.validation_images(config, 2, export_dir=str(tmp_path / "val"))
  assert paths == [str(tmp_path / "val" / "000000000285.jpg"),
                   str(tmp_path / "val" / "000000000139.jpg")]
  with Image.open(paths[0]) as image:
    assert image.format == "JPEG"
  assert predict.load_image(paths[0]).shape == (48, 64, 3)
  assert predict.load_image(paths[1]).shape == (80, 40, 3)
