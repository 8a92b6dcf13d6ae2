"""AdamW over labelled parameter groups, with global-norm clipping, as one optax transformation.

The math is torch's: `clip_grad_norm_(trainable, max_norm)` then `torch.optim.AdamW` with one
lr per group (and the official Deformable DETR loop's order). For every trainable leaf, at
update t = count + 1 (count = updates done before this one):

  g  <- g * min(1, max_norm / (norm + 1e-6))      norm: global L2 norm of all trainable grads
  mu <- b1 * mu + (1 - b1) * g                     (max_norm <= 0: no clipping)
  nu <- b2 * nu + (1 - b2) * g^2
  update = -lr_group(count) * (mu / (1 - b1^t) / (sqrt(nu / (1 - b2^t)) + eps) + wd * p)

Leaves labelled `frozen_label` get a zero update, no state and do not count in the norm.

Why not `optax.chain(masked zeroing, clip_by_global_norm, multi_transform({group: adamw}))`:
the same arithmetic, but XLA:CPU compiled that chain into about four elementwise passes per
leaf plus masking and per-group bookkeeping; a Deformable DETR with ResNet-50 has ~550 parameter
leaves, most of them small, and each pass is a separately launched op. Written as one
expression per leaf the update for the full model's 40 M parameters took 50 ms against
83 ms for the chain (2-core CPU, the update alone).
"""
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


class GroupedAdamWState(NamedTuple):
  """count: int32 scalar, updates done. mu, nu: trees like params, `optax.MaskedNode()` at
  frozen leaves (no storage)."""
  count: jax.Array
  mu: Any
  nu: Any


def trainable_global_norm(grads: Any, labels: Any, frozen_label: str = "frozen") -> jax.Array:
  """float32 scalar: the L2 norm over every leaf of `grads` whose label is not `frozen_label`.

  The clip in `grouped_adamw` and the train step's logged `grad_norm` both call this (one
  definition of which gradients count; XLA computes it once in the compiled step).
  """
  flat_labels, treedef = jax.tree.flatten(labels)
  flat_grads = treedef.flatten_up_to(grads)
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                      for g, label in zip(flat_grads, flat_labels) if label != frozen_label))


def grouped_adamw(labels: Any, learning_rates: Mapping[str, Schedule], *, b1: float, b2: float,
                  eps: float, weight_decay: float, clip_max_norm: float,
                  frozen_label: str = "frozen") -> optax.GradientTransformation:
  """The transformation described in the module docstring.

  Args:
    labels: a tree like params of group labels (strings).
    learning_rates: group label -> schedule (update count -> lr), for every label used except
      `frozen_label`.
    b1, b2, eps, weight_decay: AdamW's (decoupled decay, scaled by the group's lr).
    clip_max_norm: global-norm clip of the trainable gradients; <= 0 disables it.
    frozen_label: the label of leaves that never change.

  Returns:
    An optax GradientTransformation; `update` needs `params`.
  """
  missing = sorted({l for l in jax.tree.leaves(labels) if l != frozen_label} - set(learning_rates))
  if missing:
    raise ValueError(f"grouped_adamw: no learning rate for groups {missing}")

  def init(params):
    def zeros(p, label):
      return optax.MaskedNode() if label == frozen_label else jnp.zeros_like(p)
    mu = jax.tree.map(zeros, params, labels)
    return GroupedAdamWState(jnp.zeros((), jnp.int32), mu, jax.tree.map(jnp.copy, mu))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("grouped_adamw: update needs params (for the weight decay)")
    flat_labels, treedef = jax.tree.flatten(labels)
    flat_grads = treedef.flatten_up_to(grads)
    flat_params = treedef.flatten_up_to(params)
    flat_mu = treedef.flatten_up_to(state.mu)
    flat_nu = treedef.flatten_up_to(state.nu)
    if clip_max_norm and clip_max_norm > 0:
      norm = trainable_global_norm(grads, labels, frozen_label)
      scale = jnp.minimum(1.0, clip_max_norm / (norm + 1e-6))
    else:
      scale = jnp.ones((), jnp.float32)
    count = state.count
    t = (count + 1).astype(jnp.float32)
    bias1, bias2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    lrs = {label: learning_rates[label](count) for label in set(flat_labels) - {frozen_label}}
    updates, mu, nu = [], [], []
    for i, label in enumerate(flat_labels):
      p, g = flat_params[i], flat_grads[i]
      if label == frozen_label:
        updates.append(jnp.zeros_like(g))
        mu.append(flat_mu[i])
        nu.append(flat_nu[i])
        continue
      g = g * scale.astype(g.dtype)
      m = b1 * flat_mu[i] + (1.0 - b1) * g
      v = b2 * flat_nu[i] + (1.0 - b2) * jnp.square(g)
      step = (m / bias1) / (jnp.sqrt(v / bias2) + eps) + weight_decay * p
      updates.append((-lrs[label] * step).astype(p.dtype))
      mu.append(m)
      nu.append(v)
    return (treedef.unflatten(updates),
            GroupedAdamWState(count + 1, treedef.unflatten(mu), treedef.unflatten(nu)))

  return optax.GradientTransformation(init, update)
