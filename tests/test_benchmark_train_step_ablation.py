"""The ablation benchmark removes what it says it removes, and puts everything back afterwards."""
import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks import train_step, train_step_ablation
from ddetr_jax.models import build_model


def _tiny_model_parts(config, size=64):
  """(params as shapes, jaxpr text of a training forward pass) of the model at `size` px; traced,
  not compiled."""
  config.model.attention_impl = "xla"
  model = build_model(config)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, size, size), jnp.bool_)
  params = jax.eval_shape(lambda key, x, m: model.init(key, x, m, train=False),
                          jax.random.PRNGKey(0), images, mask)["params"]
  apply = lambda p, x, m: model.apply({"params": p}, x, m, train=True,
                                      rngs={"dropout": jax.random.PRNGKey(1)})
  return params, str(jax.make_jaxpr(apply)(params, images, mask))


def _paths(params) -> set:
  return {"/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def _tiny_config(dropout=0.1):
  config = train_step._config("tiny")  # pylint: disable=protected-access
  config.model.dropout = dropout  # the tiny config trains without dropout; give it some.
  return config


def test_each_ablation_removes_its_part():
  base_params, base_jaxpr = _tiny_model_parts(_tiny_config())
  base_paths = _paths(base_params)
  assert any("/norm1/" in p for p in base_paths)
  assert any("self_attn/q_proj" in p for p in base_paths)
  assert "ms_deform_attn" in base_jaxpr

  config = _tiny_config()
  with train_step_ablation.ablated(config, ("layer_norm",)):
    paths = _paths(_tiny_model_parts(config)[0])
  layer_norms = {p for p in base_paths if re.search(r"/norm[123]/", p)}
  assert len(layer_norms) == 2 * (2 * 2 + 3 * 2)  # scale, bias; 2 encoder, 2 decoder layers
  assert base_paths - paths == layer_norms
  assert any("group_norm" in p for p in paths)  # GroupNorm is no LayerNorm: it stays

  config = _tiny_config()
  with train_step_ablation.ablated(config, ("self_attention",)):
    paths = _paths(_tiny_model_parts(config)[0])
  assert {p for p in base_paths - paths} == {
      p for p in base_paths if "/self_attn/q_proj/" in p or "/self_attn/k_proj/" in p}

  config = _tiny_config()
  with train_step_ablation.ablated(config, ("sampler",)):
    params, jaxpr = _tiny_model_parts(config)
  assert "ms_deform_attn" not in jaxpr
  # The projections that feed the sampler stay in the model.
  assert _paths(params) == base_paths

  config = _tiny_config()
  with train_step_ablation.ablated(config, ("dropout",)):
    assert config.model.dropout == 0.0
    params, jaxpr = _tiny_model_parts(config)
  assert config.model.dropout == 0.1
  assert _paths(params) == base_paths and jaxpr != base_jaxpr
  # Without dropout the training pass is the deterministic one.
  config.model.dropout = 0.0
  assert jaxpr == _tiny_model_parts(config)[1]


def test_the_model_is_whole_again_after_the_block():
  config = _tiny_config()
  before_params, before_jaxpr = _tiny_model_parts(config)
  with train_step_ablation.ablated(config, train_step_ablation.ABLATIONS):
    _, ablated_jaxpr = _tiny_model_parts(config)
  assert ablated_jaxpr != before_jaxpr
  after_params, after_jaxpr = _tiny_model_parts(config)
  assert after_jaxpr == before_jaxpr  # the same computation, op for op
  assert _paths(after_params) == _paths(before_params)


def test_the_model_is_whole_again_after_an_error():
  config = _tiny_config()
  _, before_jaxpr = _tiny_model_parts(config)
  with pytest.raises(RuntimeError, match="inside"):
    with train_step_ablation.ablated(config, ("layer_norm", "sampler", "dropout")):
      raise RuntimeError("inside")
  assert config.model.dropout == 0.1
  assert _tiny_model_parts(config)[1] == before_jaxpr


def test_unknown_ablation_is_an_error_naming_it():
  with pytest.raises(ValueError, match="'softmax'"):
    with train_step_ablation.ablated(_tiny_config(), ("softmax",)):
      pass


def test_variants_are_the_full_step_each_alone_and_all():
  labels = train_step_ablation.variants(("sampler", "dropout"))
  assert list(labels.values()) == [(), ("sampler",), ("dropout",), ("sampler", "dropout")]
  assert list(train_step_ablation.variants(("sampler",)).values()) == [(), ("sampler",)]


def test_run_times_the_step_and_hf():
  # The full step only (each ablation's model is checked above without compiling): one tiny
  # train step compiled and timed, and one HF step, through the same code as the benchmark.
  result = train_step_ablation.run("tiny", batch_size=1, size=128, rounds=2, steps=1,
                                   ablations=(), hf_steps=1)
  assert result["target_s"] == pytest.approx(0.5 * result["hf_step_s"]) and result["hf_step_s"] > 0
  assert list(result["variants"]) == ["none (the full step)"]
  full = result["variants"]["none (the full step)"]
  assert full["step_s"] > 0 and full["compile_s"] > 0
  assert full["removed"] == [] and full["saving_s"] == 0.0
