"""The optimizer against torch.optim.AdamW with the official param groups, clip and StepLR."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from ddetr_jax import errors
from ddetr_jax import optim


def _fake_params(rng):
  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape).astype(np.float32))

  def bn(n):
    return {"scale": arr(n), "bias": arr(n), "mean": arr(n), "var": arr(n)}

  return {"params": {
      "backbone": {
          "conv1": {"kernel": arr(3, 3, 3, 4)}, "bn1": bn(4),
          "layer1_0": {"conv1": {"kernel": arr(1, 1, 4, 4)}, "bn1": bn(4)},
          "layer2_0": {"conv1": {"kernel": arr(1, 1, 4, 8)}, "bn1": bn(8),
                       "downsample_conv": {"kernel": arr(1, 1, 4, 8)}, "downsample_bn": bn(8)},
      },
      "transformer": {
          "encoder_layer_0": {"self_attn": {"sampling_offsets": {"kernel": arr(8, 6), "bias": arr(6)},
                                            "value_proj": {"kernel": arr(8, 8), "bias": arr(8)}}},
          "reference_points": {"kernel": arr(8, 2), "bias": arr(2)},
      },
      "class_embed": {"kernel": arr(8, 5), "bias": arr(5)},
  }}


def _optim_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      lr=1e-2, lr_backbone=1e-3, lr_linear_proj_mult=0.1, weight_decay=1e-1, b1=0.9, b2=0.999,
      clip_max_norm=0.1, lr_drop=2, grad_accum_steps=1))
  config.update(overrides)
  return config


def _paths(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(optim._key_name(k) for k in path): leaf for path, leaf in leaves}


def test_param_labels():
  labels = _paths(optim.param_labels(_fake_params(np.random.default_rng(0))))
  expected_frozen = [p for p in labels if p.startswith(("params/backbone/conv1", "params/backbone/bn1",
                                                        "params/backbone/layer1_0"))
                     or "/bn1/" in p or "downsample_bn" in p]
  for path, label in labels.items():
    if path in expected_frozen:
      assert label == "frozen", path
    elif path.startswith("params/backbone"):
      assert label == "backbone", path
    elif "sampling_offsets" in path or "reference_points" in path:
      assert label == "linear_proj", path
    else:
      assert label == "default", path
  assert labels["params/backbone/layer2_0/conv1/kernel"] == "backbone"
  assert labels["params/backbone/layer2_0/downsample_bn/scale"] == "frozen"
  # Without the 'params' collection key the labels are the same.
  bare = _paths(optim.param_labels(_fake_params(np.random.default_rng(0))["params"]))
  assert bare == {k[len("params/"):]: v for k, v in labels.items()}


def test_unfrozen_stem_trains_with_the_backbone_lr_and_batchnorm_stays_frozen():
  params = _fake_params(np.random.default_rng(2))
  labels = _paths(optim.param_labels(params, freeze_stem=False))
  assert labels["params/backbone/conv1/kernel"] == "backbone"
  assert labels["params/backbone/layer1_0/conv1/kernel"] == "backbone"
  assert labels["params/backbone/bn1/scale"] == "frozen"
  assert labels["params/backbone/layer1_0/bn1/var"] == "frozen"
  tx = optim.make_optimizer(_optim_config(clip_max_norm=0.0, weight_decay=0.0, freeze_stem=False),
                            4, params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates = _paths(jax.jit(tx.update)(grads, tx.init(params), params)[0])
  np.testing.assert_allclose(np.asarray(updates["params/backbone/conv1/kernel"]), -1e-3, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(updates["params/backbone/layer1_0/conv1/kernel"]), -1e-3,
                             rtol=1e-4)
  assert not np.any(np.asarray(updates["params/backbone/bn1/scale"]))
  # The official default freezes them.
  official = optim.make_optimizer(_optim_config(clip_max_norm=0.0), 4, params)
  frozen = _paths(jax.jit(official.update)(grads, official.init(params), params)[0])
  assert not np.any(np.asarray(frozen["params/backbone/conv1/kernel"]))


def test_schedule_drops_at_epoch_boundary():
  schedule = optim.learning_rate_schedule(2e-4, lr_drop=40, steps_per_epoch=10)
  np.testing.assert_allclose(float(schedule(0)), 2e-4)
  np.testing.assert_allclose(float(schedule(399)), 2e-4)
  np.testing.assert_allclose(float(schedule(400)), 2e-5)
  np.testing.assert_allclose(float(schedule(10_000)), 2e-5)


def test_first_update_lr_per_group():
  # Without clipping or decay, Adam's first update is -lr * g / (|g| + eps) = -lr * sign(g).
  params = _fake_params(np.random.default_rng(1))
  tx = optim.make_optimizer(_optim_config(clip_max_norm=0.0, weight_decay=0.0), 4, params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  lr = {"default": 1e-2, "backbone": 1e-3, "linear_proj": 1e-3, "frozen": 0.0}
  labels = _paths(optim.param_labels(params))
  for path, update in _paths(updates).items():
    # rtol: float32 bias correction (1 - 0.999) is off by ~5e-5 relative.
    np.testing.assert_allclose(np.asarray(update), -lr[labels[path]], rtol=1e-4, err_msg=path)


def _torch_reference(params, grads_per_step, config, steps_per_epoch):
  """torch AdamW with the official param groups, clip_grad_norm_ and StepLR per epoch."""
  labels = _paths(optim.param_labels(params))
  tensors = {p: torch.tensor(np.asarray(v), requires_grad=labels[p] != "frozen")
             for p, v in _paths(params).items()}
  groups = {"default": [], "backbone": [], "linear_proj": []}
  for path, t in tensors.items():
    if labels[path] != "frozen":
      groups[labels[path]].append(t)
  lrs = {"default": config.lr, "backbone": config.lr_backbone,
         "linear_proj": config.lr * config.lr_linear_proj_mult}
  opt = torch.optim.AdamW([{"params": groups[g], "lr": lrs[g]} for g in groups],
                          lr=config.lr, betas=(config.b1, config.b2), eps=1e-8,
                          weight_decay=config.weight_decay)
  scheduler = torch.optim.lr_scheduler.StepLR(opt, config.lr_drop)
  trainable = [t for p, t in tensors.items() if labels[p] != "frozen"]
  history = []
  for step, grads in enumerate(grads_per_step):
    for path, g in _paths(grads).items():
      if labels[path] != "frozen":
        tensors[path].grad = torch.tensor(np.asarray(g))
    torch.nn.utils.clip_grad_norm_(trainable, config.clip_max_norm)
    opt.step()
    if (step + 1) % steps_per_epoch == 0:
      scheduler.step()
    history.append({p: t.detach().numpy().copy() for p, t in tensors.items()})
  return history


@pytest.mark.parametrize("clip_max_norm", [0.1, 100.0])
def test_matches_torch_adamw_groups_clip_and_step_decay(clip_max_norm):
  rng = np.random.default_rng(2)
  params = _fake_params(rng)
  config = _optim_config(clip_max_norm=clip_max_norm)
  steps_per_epoch, num_steps = 2, 6  # lr drops (x0.1) from update 4 on
  grads_per_step = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
                    for _ in range(num_steps)]
  tx = optim.make_optimizer(config, steps_per_epoch, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  reference = _torch_reference(params, grads_per_step, config, steps_per_epoch)
  initial = _paths(params)
  labels = _paths(optim.param_labels(params))
  for step, grads in enumerate(grads_per_step):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for path, value in _paths(params).items():
      np.testing.assert_allclose(np.asarray(value), reference[step][path], rtol=1e-5, atol=1e-6,
                                 err_msg=f"step {step} {path}")
      if labels[path] == "frozen":
        np.testing.assert_array_equal(np.asarray(value), np.asarray(initial[path]))
      else:
        assert not np.array_equal(np.asarray(value), np.asarray(initial[path])), path


def test_gradient_accumulation_averages_micro_batches():
  rng = np.random.default_rng(3)
  params = _fake_params(rng)
  g1, g2 = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
            for _ in range(2)]
  accumulated = optim.make_optimizer(_optim_config(grad_accum_steps=2), 4, params)
  plain = optim.make_optimizer(_optim_config(), 2, params)
  state = accumulated.init(params)
  accumulate = jax.jit(accumulated.update)
  updates, state = accumulate(g1, state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  updates, state = accumulate(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = jax.jit(plain.update)(mean, plain.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  with pytest.raises(ValueError, match="grad_accum_steps=4"):
    optim.make_optimizer(_optim_config(grad_accum_steps=4), 2, params)


@pytest.mark.parametrize("key,value,message", [
    ("lr", -1.0, "config.optim.lr must be a finite number >= 0, got -1.0"),
    ("lr_backbone", float("nan"), "config.optim.lr_backbone must be a finite number >= 0, got nan"),
    ("weight_decay", -1e-4, "config.optim.weight_decay must be a finite number >= 0"),
    ("clip_max_norm", float("inf"), "config.optim.clip_max_norm must be a finite number >= 0"),
    ("b2", 1.0, r"config.optim.b2 must be in \[0, 1\), got 1.0"),
    ("b1", -0.1, r"config.optim.b1 must be in \[0, 1\), got -0.1"),
])
def test_unusable_hyperparameter_is_an_error_naming_the_key(key, value, message):
  params = _fake_params(np.random.default_rng(0))
  with pytest.raises(errors.InvalidInputError, match=message):
    optim.make_optimizer(_optim_config(**{key: value}), 4, params)


def test_zero_rates_and_norms_are_allowed():
  # lr_backbone=0 is the official way to leave the backbone untrained; 0 clip is no clipping.
  params = _fake_params(np.random.default_rng(0))
  tx = optim.make_optimizer(_optim_config(lr_backbone=0.0, clip_max_norm=0.0, weight_decay=0.0),
                            4, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates = _paths(jax.jit(tx.update)(grads, tx.init(params), params)[0])
  assert np.all(np.asarray(updates["params/backbone/layer2_0/conv1/kernel"]) == 0)
  assert np.all(np.asarray(updates["params/class_embed/kernel"]) != 0)
