"""The whole model with attention_impl='pallas' (Pallas kernel, interpret mode on this CPU)
equals attention_impl='xla' on the tiny config: forward outputs and one full train step."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from ddetr_jax import optim
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


def _run(impl, batch):
  config = _config(impl)
  model = build_model(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool),
                      train=False)["params"]
  outputs = model.apply({"params": params}, batch["images"], batch["padding_mask"], train=False)
  tx = optim.make_optimizer(config.optim, 10, params)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jnp.asarray(trainer.seed_rngs(0)[1]))
  step = jax.jit(trainer.make_train_step(model, tx, config.loss, config.model.num_classes))
  new_state, metrics = step(state, batch)
  return outputs, params, new_state.params, metrics


def test_model_pallas_matches_xla_forward_and_train_step():
  batch = _batch(np.random.default_rng(0))
  out_x, init_x, params_x, metrics_x = _run("xla", batch)
  out_p, _, params_p, metrics_p = _run("pallas", batch)
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
