"""Deformable DETR on COCO 2017 with the official defaults (the paper, Zhu et al. ICLR 2021, and
the arguments of the official code's `main.py`, github.com/fundamentalvision/Deformable-DETR).

Use as `--config configs/deformable_detr.py:VARIANT` with VARIANT one of
`single_scale`, `single_scale_dc5`, `default`, `box_refine`, `two_stage`.

Sections:
  model   typed fields of `ddetr_jax.models.DeformableDETR` (built as `DeformableDETR(**config.model)`).
  data    source, augmentation scales, batching buckets.
  loss    matcher costs and loss weights.
  optim   AdamW, learning rates, clipping, schedule.
  train   batch size, epochs, logging, checkpoints.
  eval    batch size and post-processing.
"""
import ml_collections

VARIANTS = ("single_scale", "single_scale_dc5", "default", "box_refine", "two_stage")


def model_config(variant: str = "default") -> ml_collections.ConfigDict:
  """Model fields; names follow the official argument names where one exists."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  m = ml_collections.ConfigDict()
  m.backbone_depth = 50            # ResNet depth: 18, 34, 50 or 101.
  m.backbone_norm = "frozen_bn"    # frozen_bn (official) | group (trainable, from scratch).
  m.backbone_width = 64            # stem/layer1 channels; 64 = torchvision (checkpoints need it).
  m.backbone_stem_impl = "auto"    # 7x7 stem conv: auto | xla (lax conv) | matmul (im2col); same math.
  m.dilation = variant == "single_scale_dc5"
  m.num_feature_levels = 1 if variant.startswith("single_scale") else 4
  m.hidden_dim = 256
  m.nheads = 8
  m.enc_layers = 6
  m.dec_layers = 6
  m.dim_feedforward = 1024
  m.dropout = 0.1
  m.enc_n_points = 4
  m.dec_n_points = 4
  m.num_queries = 300
  m.num_classes = 91               # raw COCO category ids (91 slots), sigmoid classification.
  m.with_box_refine = variant in ("box_refine", "two_stage")
  m.two_stage = variant == "two_stage"
  m.aux_loss = True
  m.dtype = "float32"              # compute dtype: float32 or bfloat16 (params stay float32);
                                   # float16 is accepted but untested (no loss scaling).
  m.attention_impl = "xla"         # xla | xla_packed | pallas | cpu | auto
  m.remat = False                  # jax.checkpoint each encoder/decoder layer.
  return m


def data_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = "tfds"                # tfds | coco_folder | shapes
  d.tfds_name = "coco/2017"
  d.tfds_data_dir = ""             # "" = TFDS default.
  d.train_split = "train"
  d.val_split = "validation"
  d.train_ann_file = ""            # coco_folder: annotation json and image directory.
  d.train_image_dir = ""
  d.val_ann_file = ""
  d.val_image_dir = ""
  d.category_ids = "raw"           # raw (COCO's 91-slot ids) | contiguous (0..K-1 in sorted id order).
  d.cache_dir = ""                 # shapes: where the generated dataset is written.
  d.shapes = ml_collections.ConfigDict(dict(
      num_train=0, num_val=0, image_size=0, seed=0, min_objects=0, max_objects=0))
  # Official augmentation (the official `datasets/coco.py`): flip, then multi-scale resize or
  # resize-crop-resize.
  d.train_scales = tuple(range(480, 801, 32))
  d.train_max_size = 1333
  d.crop_resize_scales = (400, 500, 600)
  d.crop_min_size = 384
  d.crop_max_size = 600
  d.crop_prob = 0.5                # probability of branch (b), the resize-crop-resize one.
  d.val_scale = 800
  d.val_max_size = 1333
  d.buckets = tuple(range(512, 1345, 128)) + (1344,)  # padded side lengths.
  d.bucket_shape = "rect"          # rect: height and width padded apart | square: H = W (fewer shapes).
  d.max_boxes = 100
  d.num_workers = 4
  d.strict = False                 # True: a corrupt image raises instead of being skipped.
  d.seed = 42
  return d


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.model = model_config(variant)
  config.data = data_config()

  config.loss = ml_collections.ConfigDict(dict(
      set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0,
      cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,
      focal_alpha=0.25, focal_gamma=2.0,
      matcher="hungarian",         # hungarian (in-graph, optax) | scipy (host callback)
  ))
  config.optim = ml_collections.ConfigDict(dict(
      lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1,
      weight_decay=1e-4, b1=0.9, b2=0.999, clip_max_norm=0.1,
      lr_drop=40,                  # epoch of the x0.1 step decay.
      grad_accum_steps=1,
      freeze_stem=True,            # stem + layer1 frozen (official); False for a from-scratch backbone.
  ))
  config.train = ml_collections.ConfigDict(dict(
      global_batch_size=32, epochs=50, num_train_steps=-1,  # -1: derived from epochs.
      seed=42, log_every=50, checkpoint_every=5000, keep_checkpoints=3,
      eval_every=-1,               # steps; -1: only at the end; 0: never.
      init_checkpoint="",          # orbax dir or torch checkpoint to fine-tune from.
  ))
  config.eval = ml_collections.ConfigDict(dict(
      batch_size=8, num_top=100, score_threshold=0.3))
  return config
