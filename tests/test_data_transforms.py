"""DETR transforms and batching, each checked on hand-computed cases."""
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from ddetr_jax.data import batching
from ddetr_jax.data import transforms


@pytest.mark.parametrize("hw, size, max_size, expected", [
    ((480, 640), 800, 1333, (800, 1066)),        # int(800 * 640 / 480) = 1066
    ((640, 480), 800, 1333, (1066, 800)),
    ((100, 1000), 800, 1333, (133, 1330)),       # capped: round(1333 * 100 / 1000) = 133
    ((800, 1200), 800, 1333, (800, 1200)),       # already the right size
    ((427, 640), 600, None, (600, 899)),         # no cap: int(600 * 640 / 427) = 899
])
def test_resized_size_official_rule(hw, size, max_size, expected):
  assert transforms.resized_size(*hw, size, max_size) == expected


def test_resize_scales_a_one_pixel_box():
  image = Image.new("RGB", (20, 10))                       # w=20, h=10
  boxes = np.array([[4, 4, 5, 5]], np.float32)
  out, out_boxes = transforms.resize(image, boxes, 20, None)
  assert out.size == (40, 20)
  np.testing.assert_allclose(out_boxes, [[8, 8, 10, 10]])


def test_hflip_mirrors_pixels_and_boxes():
  pixels = np.random.default_rng(0).integers(0, 255, (6, 10, 3), dtype=np.uint8)
  boxes = np.array([[1, 2, 4, 6], [0, 0, 10, 6]], np.float32)
  out, out_boxes = transforms.hflip(Image.fromarray(pixels), boxes)
  np.testing.assert_array_equal(np.asarray(out), pixels[:, ::-1])
  np.testing.assert_allclose(out_boxes, [[6, 2, 9, 6], [0, 0, 10, 6]])


def test_crop_cuts_a_box_in_half_and_drops_one_outside():
  pixels = np.arange(20 * 20 * 3, dtype=np.uint32).reshape(20, 20, 3).astype(np.uint8)
  boxes = np.array([[5, 5, 15, 15], [0, 0, 4, 4]], np.float32)
  labels = np.array([3, 7], np.int32)
  out, out_boxes, out_labels = transforms.crop(Image.fromarray(pixels), boxes, labels,
                                               top=2, left=10, height=18, width=10)
  np.testing.assert_array_equal(np.asarray(out), pixels[2:20, 10:20])
  np.testing.assert_allclose(out_boxes, [[0, 3, 5, 13]])
  np.testing.assert_array_equal(out_labels, [3])


def test_prepare_targets_clips_and_drops_crowd_and_degenerate():
  record = {"image": np.zeros((10, 10, 3), np.uint8),
            "boxes": np.array([[-5, -5, 5, 5], [3, 3, 3, 8], [1, 1, 4, 4], [2, 2, 30, 9]],
                              np.float32),
            "labels": np.array([1, 2, 3, 4]), "is_crowd": np.array([0, 0, 1, 0], bool)}
  boxes, labels = transforms.prepare_targets(record)
  np.testing.assert_allclose(boxes, [[0, 0, 5, 5], [2, 2, 10, 9]])
  np.testing.assert_array_equal(labels, [1, 4])


def test_normalized_cxcywh_and_image_normalization():
  np.testing.assert_allclose(
      transforms.normalized_cxcywh(np.array([[0, 0, 10, 20]], np.float32), 20, 40),
      [[0.125, 0.5, 0.25, 1.0]])
  pixels = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
  expected = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(transforms.normalize_image(pixels), expected, atol=1e-5)


def _square_record(box, height=120, width=160):
  pixels = np.zeros((height, width, 3), np.uint8)
  x0, y0, x1, y1 = box
  pixels[y0:y1, x0:x1] = 255
  return {"image": pixels, "boxes": np.array([box], np.float32), "labels": np.array([2]),
          "is_crowd": np.zeros(1, bool), "image_id": 7,
          "orig_size": np.array([height, width])}


def test_train_transform_keeps_boxes_on_the_object():
  record = _square_record((30, 40, 90, 100))
  kwargs = dict(scales=(96, 128, 160), max_size=200, crop_resize_scales=(100, 140),
                crop_min_size=60, crop_max_size=120)
  seen_crop, seen_flip = False, False
  for seed in range(40):
    out = transforms.train_transform(record, np.random.default_rng(seed), **kwargs)
    height, width = out["image"].shape[:2]
    assert tuple(out["size"]) == (height, width)
    bright = out["image"].mean(-1) > 127                       # [h, w]
    seen_crop |= abs(width / height - 4 / 3) > 0.05           # only a crop changes the aspect.
    if not bright.any():                                       # cropped away: no box left.
      assert len(out["boxes"]) == 0
      continue
    ys, xs = np.nonzero(bright)
    pixel_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    cx, cy, w, h = out["boxes"][0] * [width, height, width, height]
    box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    np.testing.assert_allclose(box, pixel_box, atol=1.5)
    assert out["labels"].tolist() == [2]
    seen_flip |= box[0] > width / 2 - 1
  assert seen_flip and seen_crop


@pytest.mark.parametrize("crop_prob", [0.0, 1.0])
def test_crop_prob_picks_the_branch(crop_prob):
  # A crop changes the aspect ratio of this 4:3 image; a plain resize never does.
  record = _square_record((30, 40, 90, 100))
  kwargs = dict(scales=(96, 128), max_size=200, crop_resize_scales=(100, 140),
                crop_min_size=40, crop_max_size=70, crop_prob=crop_prob)
  cropped = []
  for seed in range(20):
    out = transforms.train_transform(record, np.random.default_rng(seed), **kwargs)
    height, width = out["image"].shape[:2]
    cropped.append(abs(width / height - 4 / 3) > 0.05)
  assert all(cropped) if crop_prob == 1.0 else not any(cropped)


def test_eval_transform_resizes_only():
  out = transforms.eval_transform(_square_record((30, 40, 90, 100)), scale=60, max_size=100)
  assert out["image"].shape == (60, 80, 3)
  np.testing.assert_allclose(out["boxes"], [[60 / 160, 70 / 120, 60 / 160, 60 / 120]], atol=1e-6)
  assert out["orig_size"].tolist() == [120, 160]


def test_select_bucket():
  assert batching.select_bucket(30, 50, (32, 64, 128)) == 64
  assert batching.select_bucket(64, 64, (128, 64)) == 64
  with pytest.raises(ValueError, match=r"129x20.*data.buckets"):
    batching.select_bucket(129, 20, (64, 128))


def test_select_bucket_shape_square_and_rect():
  buckets = (32, 64, 128)
  assert batching.select_bucket_shape(30, 50, buckets) == (64, 64)
  assert batching.select_bucket_shape(30, 50, buckets, "rect") == (32, 64)
  assert batching.select_bucket_shape(100, 20, buckets, "rect") == (128, 32)
  # The COCO config's buckets: an 800x1066 image (shorter side 800, longer capped by 1333).
  coco = tuple(range(512, 1345, 128)) + (1344,)
  assert batching.select_bucket_shape(800, 1066, coco) == (1152, 1152)
  assert batching.select_bucket_shape(800, 1066, coco, "rect") == (896, 1152)
  with pytest.raises(ValueError, match=r"20x129.*data.buckets"):
    batching.select_bucket_shape(20, 129, (64, 128), "rect")
  with pytest.raises(ValueError, match=r"data.bucket_shape .*'round'"):
    batching.select_bucket_shape(20, 20, (64, 128), "round")


def test_bucket_shape_key_is_checked():
  config = tiny.get_config()
  config.data.bucket_shape = "Rect"
  with pytest.raises(ValueError, match=r"data.bucket_shape must be one of \('square', 'rect'\), "
                                       r"got 'Rect'"):
    batching.check_config(config.data)


def test_collate_rect_pads_height_and_width_apart():
  records = [{"image": np.full((30, 50, 3), 100, np.uint8), "boxes": np.zeros((0, 4), np.float32),
              "labels": np.zeros(0, np.int32), "image_id": 1, "orig_size": np.array([30, 50])},
             {"image": np.full((20, 60, 3), 100, np.uint8), "boxes": np.zeros((0, 4), np.float32),
              "labels": np.zeros(0, np.int32), "image_id": 2, "orig_size": np.array([20, 60])}]
  batch = batching.collate(records, buckets=(32, 64, 128), max_boxes=2, shape="rect")
  assert batch["images"].shape == (2, 32, 64, 3)  # square would be (2, 64, 64, 3)
  assert not batch["padding_mask"][0, :30, :50].any() and batch["padding_mask"][0, 30:].all()
  assert batch["padding_mask"][1, :, 60:].all() and not batch["padding_mask"][1, :20, :60].any()


def test_collate_pads_images_and_boxes():
  rng = np.random.default_rng(0)
  records = [
      {"image": rng.integers(0, 256, (30, 50, 3), dtype=np.uint8),
       "boxes": np.array([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.6, 0.5], [0.1, 0.1, 0.1, 0.1]],
                         np.float32),
       "labels": np.array([1, 2, 3], np.int32), "image_id": 5, "orig_size": np.array([60, 100])},
      {"image": rng.integers(0, 256, (60, 20, 3), dtype=np.uint8),
       "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32), "image_id": 6,
       "orig_size": np.array([60, 20])},
      batching.filler(32),
  ]
  batch = batching.collate(records, buckets=(32, 64, 128), max_boxes=2)
  assert batch["images"].shape == (3, 64, 64, 3)
  expected_mask = np.ones((3, 64, 64), bool)
  expected_mask[0, :30, :50] = False
  expected_mask[1, :60, :20] = False
  expected_mask[2, :32, :32] = False
  np.testing.assert_array_equal(batch["padding_mask"], expected_mask)
  np.testing.assert_allclose(batch["images"][0, :30, :50],
                             transforms.normalize_image(records[0]["image"]))
  assert not batch["images"][0, 30:].any() and not batch["images"][2].any()
  # Three boxes, max_boxes 2: the two largest stay in their order, one is counted as dropped.
  np.testing.assert_allclose(batch["boxes"][0], [[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.6, 0.5]])
  assert batch["labels"].tolist() == [[1, 2], [0, 0], [0, 0]]
  assert batch["box_mask"].tolist() == [[True, True], [False, False], [False, False]]
  assert batch["num_truncated_boxes"] == 1
  assert batch["valid"].tolist() == [True, True, False]
  assert batch["size"].tolist() == [[30, 50], [60, 20], [32, 32]]
  assert batch["image_id"].tolist() == [5, 6, -1]
