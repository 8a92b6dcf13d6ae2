"""The train-step benchmark's 'needed % peak' column is the speed the 0.5 target asks for."""
import math

import pytest

from benchmarks import train_step


def test_percent_of_peak_is_work_over_time_over_peak():
  # 100 GFLOP in 1 s is 100 GFLOP/s: half of a 200 GFLOP/s peak.
  assert train_step.percent_of_peak(1.0, 100.0, 200.0) == pytest.approx(50.0)
  # Half the time needs twice the speed; over 100% the target is out of reach at that peak.
  assert train_step.percent_of_peak(0.5, 100.0, 150.0) == pytest.approx(133.333, rel=1e-4)


def test_hf_runs_on_the_kind_of_device_jax_runs_on():
  assert train_step.resolve_hf_device("auto", "cpu", cuda_available=False) == "cpu"
  # A CUDA-capable torch beside a CPU-only JAX still compares CPU with CPU.
  assert train_step.resolve_hf_device("auto", "cpu", cuda_available=True) == "cpu"
  assert train_step.resolve_hf_device("auto", "gpu", cuda_available=True) == "cuda"
  # JAX on a GPU but torch without CUDA (a CPU build): HF can only run on the CPU.
  assert train_step.resolve_hf_device("auto", "gpu", cuda_available=False) == "cpu"
  assert train_step.resolve_hf_device("cpu", "gpu", cuda_available=True) == "cpu"
  assert train_step.resolve_hf_device("cuda", "gpu", cuda_available=True) == "cuda"


def test_hf_device_errors_name_the_value():
  with pytest.raises(ValueError, match="'tpu'"):
    train_step.resolve_hf_device("tpu", "cpu", cuda_available=False)
  with pytest.raises(ValueError, match="no CUDA device"):
    train_step.resolve_hf_device("cuda", "cpu", cuda_available=False)


def test_hf_step_runs_on_the_resolved_device():
  # One real HF step on the CPU through the device-aware path: the model, batch and timers.
  config = train_step._config("tiny")  # pylint: disable=protected-access
  batch = train_step._batch(2, 128, config.model.num_classes)  # pylint: disable=protected-access
  result = train_step.bench_hf(config, batch, steps=1, device="cpu")
  assert result["step_s"] > 0 and result["gflop"] > 0
  assert math.isfinite(result["loss"])
  assert train_step.bench_hf_backbone(config, batch, steps=1, device="cpu") > 0


@pytest.mark.parametrize("name", ["tiny", "full"])
def test_hf_and_jax_steps_train_the_same_parameters(name):
  # The comparison is fair only if both steps update as many weights: ResNet stages 2-4 and all
  # after them, the stem, stage 1 and the frozen BatchNorms left alone in both.
  import jax  # pylint: disable=g-import-not-at-top
  from ddetr_jax import optim, trainer  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = train_step._config(name)  # pylint: disable=protected-access
  hf = train_step.build_hf_model(config)
  hf_trained = sum(p.numel() for p in hf.parameters() if p.requires_grad)
  params = trainer.abstract_params(build_model(config), config)
  labels = jax.tree_util.tree_leaves(optim.param_labels(params))
  jax_trained = sum(math.prod(leaf.shape) for leaf, label
                    in zip(jax.tree_util.tree_leaves(params), labels) if label != "frozen")
  assert jax_trained == hf_trained
  # Both leave something frozen (the stem and stage 1), so the counts are not of everything.
  assert hf_trained < sum(p.numel() for p in hf.parameters())
