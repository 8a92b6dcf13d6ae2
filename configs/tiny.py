"""A tiny Deformable DETR for tests: same code paths, small dims, small images.

`--config configs/tiny.py:VARIANT` takes the same variants as `deformable_detr.py`.
"""
from configs import deformable_detr


def get_config(variant: str = "default"):
  config = deformable_detr.get_config(variant)
  m = config.model
  m.backbone_depth = 18
  m.hidden_dim = 32
  m.nheads = 4
  m.enc_layers = 2
  m.dec_layers = 2
  m.dim_feedforward = 64
  m.num_queries = 16
  m.num_classes = 5
  m.dropout = 0.0
  d = config.data
  d.source = "shapes"
  d.shapes.update(dict(num_train=16, num_val=8, image_size=96, seed=0, min_objects=0, max_objects=3))
  d.train_scales = (64, 80, 96)
  d.train_max_size = 128
  d.crop_resize_scales = (64, 80)
  d.crop_min_size = 48
  d.crop_max_size = 80
  d.val_scale = 96
  d.val_max_size = 128
  d.buckets = (64, 128)
  d.bucket_shape = "square"       # at most 2 batch shapes: fewer compilations in the tests
  d.max_boxes = 8
  d.num_workers = 0
  config.train.global_batch_size = 8
  config.train.epochs = 1
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.eval.batch_size = 8
  return config
