"""The embedded default: a small Deformable DETR on the generated shapes dataset.

`python train.py` uses it. The dataset (4 classes: square, circle, triangle, star; 0-4 objects per
image, 160 px images) is generated on first use into `data.cache_dir` (a few seconds) and read
as a COCO folder, so training and COCO evaluation run exactly as on real data, on a CPU.
"""
from configs import deformable_detr


def get_config(variant: str = "default"):
  config = deformable_detr.get_config(variant)
  m = config.model
  m.backbone_depth = 18
  m.hidden_dim = 128
  m.nheads = 8
  m.enc_layers = 2
  m.dec_layers = 2
  m.dim_feedforward = 256
  m.num_queries = 40
  m.num_classes = 4                # contiguous labels 0..3 (data.category_ids below).
  m.dropout = 0.0

  d = config.data
  d.source = "shapes"
  d.category_ids = "contiguous"
  d.cache_dir = ""                 # "" = ~/.cache/ddetr_jax
  d.shapes.update(dict(num_train=1600, num_val=160, image_size=160, seed=0,
                       min_objects=0, max_objects=4))
  d.train_scales = (128, 144, 160, 176, 192)
  d.train_max_size = 256
  d.crop_resize_scales = (128, 160)
  d.crop_min_size = 96
  d.crop_max_size = 160
  d.val_scale = 160
  d.val_max_size = 256
  d.buckets = (192, 256)
  d.max_boxes = 8
  d.num_workers = 2
  config.train.global_batch_size = 16
  config.train.epochs = 10
  config.eval.batch_size = 16
  return config
