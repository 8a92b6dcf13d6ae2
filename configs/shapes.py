"""The embedded default: a small two-stage Deformable DETR on the generated shapes dataset.

`python train.py` uses it. The dataset (4 classes: square, circle, triangle, star; 0-4 objects per
image, 128 px images) is generated on first use into `data.cache_dir` (a few seconds) and read
as a COCO folder, so training and COCO evaluation run exactly as on real data, on a CPU.

The recipe was picked by measuring COCO AP after 600 steps (benchmarks/RESULTS.md, "Demo"): the
two-stage variant, training the stem and layer1 of the from-scratch ResNet-18, and no random crops
each helped; a higher or lower learning rate, a GroupNorm backbone and batch 4 did not. One fixed
training scale (128) instead of (96, 112, 128) measured AP 0.376 against 0.350 after 8 epochs,
and 2 sampling points instead of 4, 12 epochs in less time than 10 with 4: 0.486 against 0.453.
At 13 epochs, 1 encoder + 4 decoder layers measured AP50 0.777-0.799 (two runs) against 0.731
with 2 + 2 (the extra decoder layers suppress duplicate detections), in a faster step. At 14
epochs a clean `make demo` gave AP 0.535 / AP50 0.797 (twice: the run is deterministic), at 16
epochs (lr drop after 15) AP 0.556 / AP50 0.835 in 12 min 19 s. With the C++ sampler kernel
(attention_impl "auto" on a CPU) the step is faster: 16 epochs gave AP 0.556 / AP50 0.805 in
9 min 56 s, 18 epochs (lr drop after 17) AP 0.589 / AP50 0.842 in 9 min 28 s of training
(benchmarks/RESULTS.md, "Demo").
"""
from configs import deformable_detr


def get_config(variant: str = "two_stage"):
  config = deformable_detr.get_config(variant)
  m = config.model
  m.backbone_depth = 18
  m.backbone_width = 32            # half the torchvision widths: 4x fewer backbone FLOPs.
  m.backbone_stem_impl = "matmul"  # the 7x7 stem conv (3 -> 32 channels, trained here) as one
                                   # matmul over patches: XLA:CPU's convolution ran it at about 18
                                   # GFLOP/s (forward 17.2 ms against 7.9, forward + kernel
                                   # gradient 26.1 against 13.9 ms at [8, 128, 128, 3]).
  m.hidden_dim = 128
  m.nheads = 8
  m.enc_layers = 1                 # 1+4 layers instead of 2+2: the decoder removes duplicate
  m.dec_layers = 4                 # detections (AP50 0.731 -> 0.777-0.799 at 13 epochs), and
                                   # one encoder layer less pays for it (a faster step).
  m.dim_feedforward = 256
  m.num_queries = 30
  m.enc_n_points = 2               # 2 sampling points per head and level instead of 4: a 20%
  m.dec_n_points = 2               # faster step, which buys more epochs in the demo's 15 minutes.
  m.with_box_refine = True         # iterative refinement (two_stage has it anyway)
  m.num_classes = 4                # contiguous labels 0..3 (data.category_ids below).
  m.dropout = 0.0
  m.attention_impl = "auto"        # the C++ sampler kernel on a CPU: a 1.2-1.4x faster train
                                   # step than "xla" here, and faster compilation.

  d = config.data
  d.source = "shapes"
  d.category_ids = "contiguous"
  d.cache_dir = ""                 # "" = ~/.cache/ddetr_jax
  d.shapes.update(dict(num_train=1500, num_val=160, image_size=128, seed=0,
                       min_objects=0, max_objects=4))
  d.train_scales = (128,)          # one scale: learns faster in a short run than (96, 112, 128).
  d.train_max_size = 128
  d.crop_resize_scales = (96, 112, 128)
  d.crop_min_size = 64
  d.crop_max_size = 112
  d.crop_prob = 0.0                # no resize-crop-resize branch: fits faster in a short run.
  d.val_scale = 128
  d.val_max_size = 128
  d.buckets = (128,)               # one shape: one compilation
  d.max_boxes = 8
  d.num_workers = 2
  # From scratch on a CPU: a higher learning rate everywhere and the stem trained too (no
  # pretrained backbone); the default in-graph matcher (at 30 queries it is faster than the
  # host scipy one, which stops the step for a callback).
  config.optim.lr = 5e-4
  config.optim.lr_backbone = 5e-4
  config.optim.freeze_stem = False
  config.optim.lr_drop = 17
  config.train.global_batch_size = 8
  config.train.epochs = 18         # 18 x 187 = 3366 steps (1500 / 8 = 187 full batches an epoch)
  config.train.log_every = 25
  config.train.checkpoint_every = 200
  config.eval.batch_size = 16
  return config
