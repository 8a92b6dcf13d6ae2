"""config.model.remat: rematerialised encoder/decoder layers compute the same outputs and
gradients, with the same parameter tree."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from ddetr_jax.models import build_model


def _model(remat: bool):
  config = tiny.get_config("single_scale")
  config.model.remat = remat
  config.model.enc_layers = 1
  config.model.dec_layers = 2
  return build_model(config)


def test_remat_same_outputs_gradients_and_params():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
  mask = np.zeros((2, 64, 64), bool)
  mask[1, 40:] = True
  plain, remat = _model(False), _model(True)
  # Under jit: one compilation instead of an op-by-op init (which compiles every op on its own).
  params, remat_params = (
      jax.jit(lambda key, m=m: m.init(key, images, mask, train=False)["params"])(
          jax.random.PRNGKey(0)) for m in (plain, remat))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(remat_params)

  def loss(model):
    def f(p):
      out = model.apply({"params": p}, images, mask, train=False)
      return out["pred_logits"].sum() + out["pred_boxes"].sum()
    return jax.jit(jax.value_and_grad(f))

  (v0, g0), (v1, g1) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
