"""The whole model with attention_impl='pallas' (Pallas kernel, interpret mode on this CPU) and
'cpu' (the C++ kernel) equals attention_impl='xla' on the tiny config: forward outputs and one
full train step; with 'cpu', a batch-sharded step on 8 devices equals the 1-device step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from ddetr_jax import optim
from ddetr_jax import sharding
from ddetr_jax import trainer
from ddetr_jax.models import build_model


def _config(impl):
  config = tiny.get_config("default")
  config.model.attention_impl = impl
  config.model.enc_layers = 1  # keep the interpreted kernel's compile time small
  config.model.dec_layers = 2
  return config


def _batch(rng):
  images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  padding_mask = np.zeros((2, 64, 64), bool)
  padding_mask[1, 40:, :] = True
  padding_mask[1, :, 48:] = True
  boxes = np.array([[[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2], [0, 0, 0, 0]],
                    [[0.3, 0.6, 0.2, 0.2], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
  return dict(images=images, padding_mask=padding_mask, boxes=boxes,
              labels=np.array([[1, 3, 0], [2, 0, 0]], np.int32),
              box_mask=np.array([[True, True, False], [True, False, False]]))


@functools.lru_cache(maxsize=None)
def _init_params():
  """The tiny model's params (seed 0), host numpy. The sampler impl plays no part in the
  parameters, so every impl starts from these (initialised once, under jit: one compilation
  instead of an op-by-op init that compiles every op on its own)."""
  model = build_model(_config("xla"))
  return jax.device_get(jax.jit(lambda key: model.init(
      key, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool), train=False)["params"])(
          jax.random.PRNGKey(0)))


def _run(impl, batch):
  config = _config(impl)
  model = build_model(config)
  params = jax.tree.map(jnp.asarray, _init_params())
  outputs = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, train=False))(
      params, batch["images"], batch["padding_mask"])
  tx = optim.make_optimizer(config.optim, 10, params)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jnp.asarray(trainer.seed_rngs(0)[1]))
  step = jax.jit(trainer.make_train_step(model, tx, config.loss, config.model.num_classes))
  new_state, metrics = step(state, batch)
  return outputs, params, new_state.params, metrics


@pytest.fixture(scope="module")
def xla_run():
  """The 'xla' reference run on the seed-0 batch, shared by both parametrisations."""
  batch = _batch(np.random.default_rng(0))
  return batch, _run("xla", batch)


@pytest.mark.parametrize("impl", ["pallas", "cpu"])
def test_model_matches_xla_forward_and_train_step(impl, xla_run):
  batch, (out_x, init_x, params_x, metrics_x) = xla_run
  out_p, _, params_p, metrics_p = _run(impl, batch)
  for key in ("pred_logits", "pred_boxes"):
    np.testing.assert_allclose(np.asarray(out_p[key]), np.asarray(out_x[key]),
                               rtol=1e-4, atol=1e-5, err_msg=key)
  np.testing.assert_allclose(float(metrics_p["loss"]), float(metrics_x["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics_p["grad_norm"]), float(metrics_x["grad_norm"]),
                             rtol=1e-4)
  moved = 0
  for (path, p), x, p0 in zip(jax.tree_util.tree_flatten_with_path(params_p)[0],
                              jax.tree.leaves(params_x), jax.tree.leaves(init_x)):
    np.testing.assert_allclose(np.asarray(p), np.asarray(x), rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
    moved += "sampling_offsets" in jax.tree_util.keystr(path) and not np.allclose(p, p0)
  assert moved > 0, "the train step must update the sampling offsets (gradient through the op)"


def test_cpu_kernel_train_step_on_eight_devices_matches_xla():
  # The same batch-sharded step (8 images on 8 devices) with each impl. Plain SGD, so the
  # parameter change is the gradient itself (Adam's first step is lr * the gradient's sign,
  # which turns rounding noise in gradients near zero into full-size steps).
  assert jax.device_count() == 8
  rng = np.random.default_rng(1)
  batches = [_batch(rng) for _ in range(4)]
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}  # 8 images
  mesh = sharding.make_mesh()
  results = {}
  for impl in ("xla", "cpu"):
    config = _config(impl)
    model = build_model(config)
    params = _init_params()
    tx = optax.sgd(1.0)
    state = sharding.replicate(trainer.TrainState(
        step=np.int32(0), params=jax.tree.map(np.copy, params), opt_state=tx.init(params),
        rng=trainer.seed_rngs(0)[1]), mesh)
    step = trainer.jit_train_step(
        trainer.make_train_step(model, tx, config.loss, config.model.num_classes), mesh, state)
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    grads = jax.tree.map(lambda p0, p1: p0 - np.asarray(p1), params, jax.device_get(state.params))
    results[impl] = grads, jax.device_get(metrics)
  (grads_x, metrics_x), (grads_c, metrics_c) = results["xla"], results["cpu"]
  np.testing.assert_allclose(metrics_c["loss"], metrics_x["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_c["grad_norm"], metrics_x["grad_norm"], rtol=1e-4)
  moved = 0
  for (path, g_c), g_x in zip(jax.tree_util.tree_flatten_with_path(grads_c)[0],
                              jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(g_c, g_x, rtol=1e-3, atol=1e-4 * max(np.abs(g_x).max(), 1e-3),
                               err_msg=jax.tree_util.keystr(path))
    moved += "sampling_offsets" in jax.tree_util.keystr(path) and np.abs(g_c).max() > 0
  assert moved > 0
