"""grouped_adamw.py against optax's own AdamW per group, and its state layout.

(tests/test_optim.py checks the configured optimizer against torch.optim.AdamW.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddetr_jax.grouped_adamw import GroupedAdamWState, grouped_adamw


def _tree(rng):
  arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"a": {"kernel": arr(4, 3), "bias": arr(3)}, "b": {"kernel": arr(3, 2)},
          "frozen": {"scale": arr(5)}, "c": arr(7)}


LABELS = {"a": {"kernel": "x", "bias": "x"}, "b": {"kernel": "y"}, "frozen": {"scale": "frozen"},
          "c": "y"}


def _optax_reference(lrs, clip, wd):
  """Clip-then-AdamW from optax parts; torch's clip coefficient max / (norm + 1e-6)."""
  def clip_like_torch():
    def update(updates, state, params=None):
      del params
      trainable = {k: v for k, v in updates.items() if k != "frozen"}
      norm = optax.global_norm(trainable)
      scale = jnp.minimum(1.0, clip / (norm + 1e-6))
      return jax.tree.map(lambda g: g * scale, updates), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  groups = {k: optax.adamw(v, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd) for k, v in lrs.items()}
  groups["frozen"] = optax.set_to_zero()
  return optax.chain(clip_like_torch(), optax.multi_transform(groups, LABELS))


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_matches_optax_adamw_per_group(clip):
  rng = np.random.default_rng(0)
  params = _tree(rng)
  lrs = {"x": 1e-2, "y": 3e-3}
  ours = grouped_adamw(LABELS, {k: optax.constant_schedule(v) for k, v in lrs.items()}, b1=0.9,
                       b2=0.999, eps=1e-8, weight_decay=0.1, clip_max_norm=clip)
  reference = _optax_reference(lrs, clip if clip > 0 else 1e30, 0.1)
  p1, p2 = params, params
  s1, s2 = ours.init(params), reference.init(params)
  for _ in range(4):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    u1, s1 = jax.jit(ours.update)(grads, s1, p1)
    u2, s2 = reference.update(grads, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(p1["frozen"]["scale"], params["frozen"]["scale"])
  assert int(s1.count) == 4


def test_schedule_sees_the_count_of_updates_done():
  params = _tree(np.random.default_rng(1))
  schedule = lambda count: jnp.where(count < 1, 1.0, 0.0)
  tx = grouped_adamw(LABELS, {"x": schedule, "y": schedule}, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=0.0, clip_max_norm=0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  first, state = tx.update(grads, state, params)
  second, state = tx.update(grads, state, params)
  # Adam's first step with g = 1 everywhere is -lr * 1 / (1 + eps) (float32 bias correction
  # 1 - 0.999 is off by ~7e-6 relative); the second has lr 0.
  np.testing.assert_allclose(first["a"]["kernel"], -1.0, rtol=1e-4)
  np.testing.assert_array_equal(second["a"]["kernel"], 0.0)


def test_frozen_leaves_have_no_state_and_missing_groups_are_named():
  params = _tree(np.random.default_rng(2))
  tx = grouped_adamw(LABELS, {"x": optax.constant_schedule(1.0), "y": optax.constant_schedule(1.0)},
                     b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_max_norm=1.0)
  state = tx.init(params)
  assert isinstance(state, GroupedAdamWState)
  assert isinstance(state.mu["frozen"]["scale"], optax.MaskedNode)
  assert sum(x.size for x in jax.tree.leaves(state.mu)) == 4 * 3 + 3 + 3 * 2 + 7
  with pytest.raises(ValueError, match=r"\['y'\]"):
    grouped_adamw(LABELS, {"x": optax.constant_schedule(1.0)}, b1=0.9, b2=0.999, eps=1e-8,
                  weight_decay=0.0, clip_max_norm=1.0)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state)
