"""Prediction on image files: image modes, any size (also one the resize rule leaves longer than
the largest bucket), unreadable files, the detections json, inputs never overwritten, validation
images (files, or exported from TFDS records)."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from ddetr_jax import errors
from ddetr_jax import predict
from ddetr_jax.data import transforms
from ddetr_jax.models import build_model
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


def test_image_batch_pads_an_image_longer_than_the_largest_bucket():
  """The official rule leaves 1000x333 at 43x129 for max_size 128: padded to 192, not an error."""
  config = tiny.get_config()  # val_scale 96, val_max_size 128, buckets (64, 128)
  assert transforms.resized_size(333, 1000, config.data.val_scale,
                                 config.data.val_max_size) == (43, 129)
  batch = predict.image_batch(np.zeros((333, 1000, 3), np.uint8), config)
  assert tuple(batch["size"][0]) == (43, 129)
  assert batch["images"].shape == (1, 192, 192, 3)  # 129 rounded up to a multiple of 64
  assert not batch["padding_mask"][0, :43, :129].any()
  assert batch["padding_mask"][0, 43:].all() and batch["padding_mask"][0, :, 129:].all()
  assert tuple(batch["orig_size"][0]) == (333, 1000)
  assert predict.padded_shape(43, 129, (64, 128)) == (192, 192)
  assert predict.padded_shape(43, 128, (64, 128)) == (128, 128)  # the buckets when one fits
  assert predict.padded_shape(43, 64, (64, 128)) == (64, 64)
  # Rectangular buckets: each side on its own.
  assert predict.padded_shape(43, 129, (64, 128), "rect") == (64, 192)
  assert predict.padded_shape(100, 43, (64, 128), "rect") == (128, 64)
  with pytest.raises(ValueError, match=r"data.bucket_shape .*'Rect'"):
    predict.padded_shape(100, 43, (64, 128), "Rect")
  config.data.bucket_shape = "rect"
  batch = predict.image_batch(np.zeros((333, 1000, 3), np.uint8), config)
  assert batch["images"].shape == (1, 64, 192, 3)
  assert not batch["padding_mask"][0, :43, :129].any()
  assert batch["padding_mask"][0, 43:].all() and batch["padding_mask"][0, :, 129:].all()


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


def _two_class_config_and_folder(tmp_path):
  """tiny's config with 2 classes (those `_FixedModel` predicts) and an empty tmp_path/images."""
  config = tiny.get_config()
  config.model.num_classes = 2
  images = tmp_path / "images"
  images.mkdir()
  return config, images


def test_predict_files(tmp_path, caplog):
  config, images = _two_class_config_and_folder(tmp_path)
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


def test_predict_files_on_an_image_longer_than_the_largest_bucket(tmp_path):
  """Every image is predicted and detections.json written, a 1000x333 photo included."""
  config, images = _two_class_config_and_folder(tmp_path)
  Image.fromarray(np.full((333, 1000, 3), 90, np.uint8)).save(images / "a_wide.jpg")
  Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(images / "b.png")
  summary = predict.predict_files(_FixedModel(), {}, config, [str(images)], str(tmp_path / "out"),
                                  threshold=0.5, num_attention=0, class_names=["cat", "dog"])
  assert summary["skipped"] == []
  assert [os.path.basename(e["file"]) for e in summary["images"]] == ["a_wide.jpg", "b.png"]
  wide = summary["images"][0]
  np.testing.assert_allclose(wide["detections"][0]["box_xyxy"], [250.0, 83.25, 750.0, 249.75],
                             atol=1e-3)
  with Image.open(wide["output"]) as annotated:
    assert annotated.size == (1000, 333)
  assert json.loads((tmp_path / "out" / "detections.json").read_text()) == summary


def _digests(directory) -> dict:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_predict_files_into_the_input_directory_keeps_the_inputs(tmp_path):
  """--out equal to the input directory: no input is replaced; outputs get free names."""
  config, images = _two_class_config_and_folder(tmp_path)
  Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(images / "a.jpg")
  Image.fromarray(np.full((30, 20, 3), 50, np.uint8)).save(images / "a.png")  # also stem 'a'
  Image.fromarray(np.full((30, 30, 3), 10, np.uint8)).save(images / "a_pred.jpg")
  (images / "detections.json").write_text('{"mine": 1}')  # matched by the glob, not an image
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(elsewhere / "c.png")
  os.symlink(elsewhere / "c.png", images / "c.jpg")  # out/c.jpg resolves to the input c.png
  inputs = _digests(images)
  summary = predict.predict_files(_FixedModel(), {}, config, [str(images / "*")], str(images),
                                  threshold=0.5, num_attention=0, class_names=["cat", "dog"])
  after = _digests(images)
  assert {name: after[name] for name in inputs} == inputs  # every input byte for byte
  assert (elsewhere / "c.png").read_bytes() == inputs["c.jpg"]
  outputs = {os.path.basename(e["file"]): os.path.basename(e["output"])
             for e in summary["images"]}
  # sorted inputs: a.jpg, a.png, a_pred.jpg, c.jpg (the symlink, read as c.png's pixels).
  assert outputs == {"a.jpg": "a_pred2.jpg", "a.png": "a_pred3.jpg",
                     "a_pred.jpg": "a_pred_pred.jpg", "c.jpg": "c_pred.jpg"}
  for entry in summary["images"]:
    with Image.open(entry["output"]) as annotated:
      assert annotated.size == (entry["width"], entry["height"])
  assert [os.path.basename(e["file"]) for e in summary["skipped"]] == ["detections.json"]
  assert json.loads((images / "detections_pred.json").read_text()) == summary
  assert set(after) == set(inputs) | set(outputs.values()) | {"detections_pred.json"}


def test_other_files_in_out_are_kept_and_a_rerun_replaces_its_own_outputs(tmp_path):
  """Only *.png are predicted into their folder: the user's cat.jpg (not an input) is kept; a
  second run replaces the first run's pictures and json instead of adding new names."""
  config, images = _two_class_config_and_folder(tmp_path)
  Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(images / "cat.png")
  Image.fromarray(np.full((30, 20, 3), 50, np.uint8)).save(images / "cat.jpg")  # the user's
  Image.fromarray(np.full((20, 30, 3), 10, np.uint8)).save(images / "dog.png")
  mine = (images / "cat.jpg").read_bytes()
  runs = []
  for _ in range(2):
    summary = predict.predict_files(_FixedModel(), {}, config, [str(images / "*.png")],
                                    str(images), threshold=0.5, num_attention=0,
                                    class_names=["cat", "dog"])
    runs.append(sorted(os.listdir(images)))
    outputs = {os.path.basename(e["file"]): os.path.basename(e["output"])
               for e in summary["images"]}
    assert outputs == {"cat.png": "cat_pred.jpg", "dog.png": "dog.jpg"}
    assert json.loads((images / "detections.json").read_text()) == summary
  assert (images / "cat.jpg").read_bytes() == mine
  assert runs[0] == runs[1] == ["cat.jpg", "cat.png", "cat_pred.jpg", "detections.json",
                                "dog.jpg", "dog.png"]  # the rerun wrote the same names again


@pytest.fixture(scope="module")
def tiny_detector():
  """The tiny config's detector (1 encoder, 1 decoder layer), randomly initialised."""
  config = tiny.get_config()
  config.model.enc_layers = config.model.dec_layers = 1
  config.eval.num_top = 10
  model = build_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32),
                               np.zeros((1, 64, 64), bool))["params"]
  return config, model, params


def test_real_model_on_a_wide_photo_in_its_own_directory(tiny_detector, tmp_path):
  """A real detector on the 192-padded 1000x333 photo; its sampling-point picture, like the
  annotated one, takes a free name instead of replacing an input."""
  config, model, params = tiny_detector
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (333, 1000, 3), np.uint8)).save(tmp_path / "wide.png")
  Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8)).save(
      tmp_path / "wide_attention.png")  # an input named like wide.png's sampling-point picture
  inputs = _digests(tmp_path)
  summary = predict.predict_files(model, params, config, [str(tmp_path)], str(tmp_path),
                                  threshold=0.0, num_attention=1,
                                  class_names=[str(i) for i in range(5)])
  assert _digests(tmp_path)["wide.png"] == inputs["wide.png"]
  assert _digests(tmp_path)["wide_attention.png"] == inputs["wide_attention.png"]
  entry = next(e for e in summary["images"] if e["file"].endswith("wide.png"))
  assert os.path.basename(entry["output"]) == "wide_pred.jpg"
  assert [os.path.basename(p) for p in entry["attention"]] == ["wide_pred_attention.png"]
  assert len(entry["detections"]) == config.eval.num_top
  boxes = np.array([d["box_xyxy"] for d in entry["detections"]])
  assert np.isfinite(boxes).all()
  assert (boxes >= -1e-3).all() and (boxes[:, [0, 2]] <= 1000 + 1e-3).all()
  assert (boxes[:, [1, 3]] <= 333 + 1e-3).all()
  with Image.open(entry["attention"][0]) as picture:
    assert picture.format == "PNG"
  assert json.loads((tmp_path / "detections.json").read_text()) == summary


def test_only_unreadable_files_is_a_user_error(tmp_path, caplog):
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "data.csv").write_text("1,2")
  pattern = str(tmp_path / "*")
  with pytest.raises(errors.InvalidInputError, match="none of the files matching") as raised:
    predict.predict_files(_FixedModel(), {}, tiny.get_config(), [pattern], str(tmp_path / "out"),
                          num_attention=0, class_names=["cat", "dog"])
  assert isinstance(raised.value, errors.UserError)
  assert pattern in str(raised.value) and "could be read as an image (2 skipped" in str(raised.value)
  assert "notes.txt" in caplog.text and "data.csv" in caplog.text
  assert not (tmp_path / "out" / "detections.json").exists()


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
