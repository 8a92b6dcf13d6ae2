"""AdamW with the official Deformable DETR parameter groups, clipping and step decay.

Parameter groups, decided by the path of each leaf in the params tree (a leading
'params' collection key is ignored):
  'frozen'      paths under backbone/conv1, backbone/bn1, backbone/layer1_* (the stem and the
                first stage; unless `freeze_stem=False`), and any path whose module component
                contains 'bn' (frozen BatchNorm): update is exactly zero, no weight decay, and
                their gradients are excluded from the clip norm (the official code sets
                requires_grad=False on them);
  'backbone'    other paths under `backbone`: lr_backbone;
  'linear_proj' any path component named `sampling_offsets` or `reference_points`:
                lr * lr_linear_proj_mult;
  'default'     everything else: lr.
All trainable groups use AdamW(b1, b2, eps=1e-8, weight_decay) with decoupled decay scaled by
the group's (scheduled) lr, as torch.optim.AdamW. Order of operations as in the official
loop: frozen gradients ignored -> global-norm clip over all trainable gradients
(clip_max_norm; <= 0 disables; torch's clip_grad_norm_ formula) -> per-group AdamW; all of it
is one transformation, `grouped_adamw.grouped_adamw` (see there why not an optax chain). The
lr of every group is multiplied by 0.1 from epoch `lr_drop` on (torch StepLR stepped once per
epoch).

`config.optim.freeze_stem` (default True, the official choice for an ImageNet-pretrained
backbone) may be set False to train the stem and first stage too: sensible only for a backbone
trained from scratch, as in configs/shapes.py. Frozen BatchNorm stays frozen either way.

Gradient accumulation (grad_accum_steps > 1) wraps everything in `optax.MultiSteps`:
gradients of k consecutive `update` calls are averaged, then one real update is made.
"""
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ddetr_jax import errors
from ddetr_jax import grouped_adamw

GROUPS = ("default", "backbone", "linear_proj", "frozen")
_FROZEN_BACKBONE_MODULES = ("conv1", "bn1")
_LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def label_for_path(path: tuple, freeze_stem: bool = True) -> str:
  """Group label of one parameter path (a tuple of names, leaf name last)."""
  if path and path[0] == "params":
    path = path[1:]
  modules = path[:-1]  # the leaf name ('kernel', 'scale', ...) is not a module name
  if any("bn" in name for name in modules):
    return "frozen"
  if path and path[0] == "backbone":
    if freeze_stem and len(path) > 1 and (path[1] in _FROZEN_BACKBONE_MODULES
                                          or path[1].startswith("layer1_")):
      return "frozen"
    return "backbone"
  if any(name in _LINEAR_PROJ_NAMES for name in modules):
    return "linear_proj"
  return "default"


def param_labels(params: Any, freeze_stem: bool = True) -> Any:
  """The tree of group labels ('default' | 'backbone' | 'linear_proj' | 'frozen') for params."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: label_for_path(tuple(_key_name(k) for k in path), freeze_stem), params)


def learning_rate_schedule(base_lr: float, lr_drop: int, steps_per_epoch: int,
                           drop_factor: float = 0.1) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Step decay: base_lr before update number lr_drop * steps_per_epoch, then base_lr * 0.1.

  Args:
    base_lr: initial learning rate.
    lr_drop: epoch from which the lr is multiplied by drop_factor (<= 0: never).
    steps_per_epoch: optimizer updates per epoch.
    drop_factor: the multiplier.

  Returns:
    An optax schedule: update count (0 for the first update) -> lr.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"learning_rate_schedule: steps_per_epoch must be > 0, got {steps_per_epoch}")
  if lr_drop <= 0:
    return optax.constant_schedule(base_lr)
  boundary = lr_drop * steps_per_epoch

  def schedule(count):
    return jnp.where(count < boundary, base_lr, base_lr * drop_factor)

  return schedule


def _check_hyperparameters(c: Any) -> None:
  """Raises errors.InvalidInputError naming the config.optim key of a value AdamW cannot use: a
  negative (or non-finite) rate, decay or clip norm (0 is allowed: no update, no decay, no
  clipping), or a moment decay outside [0, 1)."""
  for key in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm"):
    if key in c and not (math.isfinite(float(c[key])) and float(c[key]) >= 0):
      raise errors.InvalidInputError(
          f"config.optim.{key} must be a finite number >= 0, got {c[key]!r}")
  for key in ("b1", "b2"):
    if key in c and not 0 <= float(c[key]) < 1:
      raise errors.InvalidInputError(f"config.optim.{key} must be in [0, 1), got {c[key]!r}")


def make_optimizer(optim_config: Any, steps_per_epoch: int, params: Any
                   ) -> optax.GradientTransformation:
  """The training optimizer.

  Args:
    optim_config: config.optim: lr, lr_backbone, lr_linear_proj_mult, weight_decay, b1, b2,
      clip_max_norm, lr_drop (epoch), grad_accum_steps, freeze_stem (default True).
    steps_per_epoch: calls of `update` (train steps, i.e. micro-batches when accumulating)
      per epoch; the schedule counts real updates, steps_per_epoch // grad_accum_steps per epoch.
    params: the params tree (or a tree of the same structure, e.g. shapes) for the labels.

  Returns:
    An optax GradientTransformation (an optax.MultiSteps one when grad_accum_steps > 1; its
    state is `MultiStepsState`, whose `mini_step` says where in the accumulation it is).
  """
  c = optim_config
  _check_hyperparameters(c)
  accum = int(c.get("grad_accum_steps", 1) or 1)
  if accum < 1:
    raise errors.InvalidInputError(f"config.optim.grad_accum_steps must be >= 1, got {accum}")
  if steps_per_epoch < accum:
    raise errors.InvalidInputError(f"make_optimizer: steps_per_epoch={steps_per_epoch} is smaller "
                                   f"than config.optim.grad_accum_steps={accum}")
  updates_per_epoch = steps_per_epoch // accum
  labels = param_labels(params, bool(c.get("freeze_stem", True)))

  def schedule(lr):
    return learning_rate_schedule(lr, c.lr_drop, updates_per_epoch)

  optimizer = grouped_adamw.grouped_adamw(
      labels, {"default": schedule(c.lr), "backbone": schedule(c.lr_backbone),
               "linear_proj": schedule(c.lr * c.lr_linear_proj_mult)},
      b1=c.b1, b2=c.b2, eps=1e-8, weight_decay=c.weight_decay,
      clip_max_norm=c.clip_max_norm or 0.0)
  if accum > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=accum).gradient_transformation()
  return optimizer
