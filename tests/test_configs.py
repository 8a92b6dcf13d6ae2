"""The configs: official defaults for the five variants (the official `main.py` arguments and
`configs/*.sh`) and a consistent embedded default (configs/shapes.py)."""
import pytest

from configs import deformable_detr, shapes, tiny
from ddetr_jax import data
from ddetr_jax.data import batching
from ddetr_jax.models import build_model

# variant -> (num_feature_levels, dilation, with_box_refine, two_stage), from the official flags.
OFFICIAL_FLAGS = {
    "single_scale": (1, False, False, False),
    "single_scale_dc5": (1, True, False, False),
    "default": (4, False, False, False),
    "box_refine": (4, False, True, False),
    "two_stage": (4, False, True, True),
}


@pytest.mark.parametrize("variant", sorted(OFFICIAL_FLAGS))
def test_official_defaults(variant):
  config = deformable_detr.get_config(variant)
  m, o, l = config.model, config.optim, config.loss
  assert (m.num_feature_levels, m.dilation, m.with_box_refine, m.two_stage) == OFFICIAL_FLAGS[variant]
  assert (m.backbone_depth, m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers) == (50, 256, 8, 6, 6)
  assert (m.dim_feedforward, m.dropout, m.enc_n_points, m.dec_n_points) == (1024, 0.1, 4, 4)
  assert (m.num_queries, m.num_classes, m.aux_loss) == (300, 91, True)
  assert (o.lr, o.lr_backbone, o.lr_linear_proj_mult, o.weight_decay) == (2e-4, 2e-5, 0.1, 1e-4)
  assert (o.clip_max_norm, o.lr_drop, config.train.epochs) == (0.1, 40, 50)
  assert (l.set_cost_class, l.set_cost_bbox, l.set_cost_giou) == (2.0, 5.0, 2.0)
  assert (l.cls_loss_coef, l.bbox_loss_coef, l.giou_loss_coef, l.focal_alpha) == (2.0, 5.0, 2.0, 0.25)
  assert config.data.train_scales == tuple(range(480, 801, 32)) and config.data.train_max_size == 1333
  assert (config.data.val_scale, config.data.val_max_size) == (800, 1333)
  d = config.data  # the resize-crop-resize branch
  assert (d.crop_resize_scales, d.crop_min_size, d.crop_max_size, d.crop_prob) == (
      (400, 500, 600), 384, 600, 0.5)
  assert (o.b1, o.b2, l.focal_gamma) == (0.9, 0.999, 2.0)
  assert (config.train.global_batch_size, config.eval.num_top) == (32, 100)  # 16 GPUs x 2; top-100
  build_model(config)  # every model field is one the module takes


def test_two_stage_on_images_too_small_for_its_queries_names_both_numbers():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddetr_jax import errors  # pylint: disable=g-import-not-at-top
  config = tiny.get_config("two_stage")
  config.model.num_queries = 200
  model = build_model(config)
  # 64 px: 8x8 + 4x4 + 2x2 + 1x1 = 85 encoder positions to pick 200 proposals from.
  with pytest.raises(errors.InvalidInputError,
                     match=r"its 200 queries .* only 85 \(8x8 \+ 4x4 \+ 2x2 \+ 1x1 over"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                   jnp.zeros((1, 64, 64), bool))
  jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)),
                 jnp.zeros((1, 128, 128), bool))  # 16x16 + ... = 340 positions: enough.


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="unknown variant"):
    deformable_detr.get_config("three_stage")


@pytest.mark.parametrize("get_config", [tiny.get_config, shapes.get_config])
def test_small_configs_fit_their_data(get_config, tmp_path):
  """num_classes equals the dataset's categories and every resized image fits a bucket."""
  config = get_config()
  config.data.cache_dir = str(tmp_path)
  config.data.shapes.num_train = 4
  config.data.shapes.num_val = 4
  assert len(data.category_names(config.data)) == config.model.num_classes
  for scale, max_size in ((max(config.data.train_scales), config.data.train_max_size),
                          (config.data.val_scale, config.data.val_max_size)):
    batching.select_bucket(max_size, max_size, config.data.buckets)  # raises if it does not fit
    assert scale <= max_size
  build_model(config)
