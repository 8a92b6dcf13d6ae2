"""trainer.train_and_evaluate end to end with the real model on a cut-down tiny config.

Independent references: the same run on 1 device vs 8 fake devices; an uninterrupted run vs one
stopped by SIGTERM and then SIGKILL and restarted; freshly initialised params (frozen groups);
TensorBoard event records parsed here from the file format; PNG signature.
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddetr_jax import data as data_lib
from ddetr_jax import errors
from ddetr_jax import evaluator
from ddetr_jax import optim
from ddetr_jax import sharding
from ddetr_jax import trainer
from ddetr_jax.models import build_model
from tests import train_worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = train_worker.NUM_STEPS


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
  previous = jax.config.jax_compilation_cache_dir
  train_worker.use_compilation_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", previous)


def _train_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r for r in rows if r["kind"] == "train"}, [r for r in rows if r["kind"] == "eval"]


def _params(workdir, step):
  return evaluator.load_params(os.path.join(workdir, "checkpoints", str(step)))


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _event_scalars(directory):
  """{tag: [(step, value)]} read from TFRecord-framed Event protos (the format, parsed here)."""
  from tensorboard.compat.proto import event_pb2
  scalars = {}
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one_device"))
  config = train_worker.small_config(eval_every=-1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  metrics = trainer.train_and_evaluate(config, workdir, mesh=mesh)
  return workdir, metrics


def test_one_device_run_writes_metrics_plot_events_checkpoints(one_device_run):
  workdir, metrics = one_device_run
  train, evals = _train_rows(workdir)
  assert sorted(train) == list(range(1, STEPS + 1))
  for row in train.values():
    assert np.isfinite(row["loss"]) and row["loss"] > 0
    assert row["lr"] == pytest.approx(2e-4)
    assert row["images_per_sec"] > 0
    # The weighted total is the sum of the logged terms with the official coefficients.
    expected = sum(c * sum(row[f"{t}{s}"] for s in ("", "_0"))
                   for t, c in (("loss_ce", 2.0), ("loss_bbox", 5.0), ("loss_giou", 2.0)))
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
  assert [e["step"] for e in evals] == [STEPS]
  with open(os.path.join(workdir, "coco_metrics.json")) as f:
    coco = json.load(f)
  assert coco["step"] == STEPS and set(evaluator.METRIC_NAMES) <= set(coco)
  assert metrics["step"] == STEPS and metrics["AP"] == coco["AP"]
  assert metrics["train_loss"] == pytest.approx(train[STEPS]["loss"])
  with open(os.path.join(workdir, "training_curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  events = _event_scalars(os.path.join(workdir, "tensorboard"))
  assert [s for s, _ in events["train/loss"]] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([v for _, v in events["train/loss"]],
                             [train[s]["loss"] for s in range(1, STEPS + 1)], rtol=1e-6)
  assert events["eval/AP"] == [(STEPS, pytest.approx(coco["AP"]))]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]


def test_eight_devices_match_one_device(one_device_run, tmp_path):
  workdir_1, _ = one_device_run
  config = train_worker.small_config()
  assert len(jax.devices()) == 8
  trainer.train_and_evaluate(config, str(tmp_path), mesh=sharding.make_mesh())
  train_1, _ = _train_rows(workdir_1)
  train_8, _ = _train_rows(str(tmp_path))
  for step in range(1, STEPS + 1):
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"):
      assert train_8[step][key] == pytest.approx(train_1[step][key], rel=2e-4, abs=1e-6), (step, key)
  final_1, final_8 = _flat(_params(workdir_1, STEPS)), _flat(_params(str(tmp_path), STEPS))
  train_worker.assert_params_match(final_8, final_1, config.optim.lr, STEPS)


def test_frozen_parameters_never_change(one_device_run):
  workdir, _ = one_device_run
  config = train_worker.small_config()
  mesh = sharding.make_mesh(jax.devices()[:1])
  init = _flat(trainer.init_params(build_model(config), config,
                                   trainer.seed_rngs(config.train.seed)[0], mesh))
  final = _flat(_params(workdir, STEPS))
  labels = _flat(optim.param_labels(jax.tree.map(lambda x: 0, _params(workdir, STEPS))))
  frozen = [k for k in final if labels[k] == "frozen"]
  trainable = [k for k in final if labels[k] != "frozen"]
  assert any(k.startswith("backbone/layer1_0") for k in frozen) and any("bn" in k for k in frozen)
  for key in frozen:
    np.testing.assert_array_equal(final[key], init[key], err_msg=key)
  changed = [k for k in trainable if not np.array_equal(final[k], init[k])]
  assert len(changed) >= 0.9 * len(trainable), sorted(set(trainable) - set(changed))


_PROCS = []


@pytest.fixture(autouse=True)
def _kill_leftover_workers():
  yield
  while _PROCS:
    proc = _PROCS.pop()
    if proc.poll() is None:
      proc.kill()  # a failed test must not leave a paused worker behind.
      proc.wait()


def _worker(workdir, *extra):
  """The worker on 1 device (the same program as `one_device_run`: compiled once, cached)."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "tests.train_worker", "--workdir", workdir, "--devices", "1",
       *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, PYTHONPATH=REPO))
  _PROCS.append(proc)
  return proc


def _wait_for(proc, word):
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if word in line:  # tqdm (stderr, merged) writes \r-updates without newlines.
      return
  raise AssertionError(f"worker ended (rc {proc.wait()}) before {word}:\n" + "".join(lines[-40:]))


def test_sigterm_checkpoint_then_sigkill_resume_is_exact(one_device_run, tmp_path):
  """SIGTERM after step 2 -> checkpoint 3 and a clean exit; resume, SIGKILL after step 5 (last
  checkpoint 4); resume to 6: the params equal the uninterrupted run's."""
  reference, _ = one_device_run
  workdir, go = str(tmp_path / "run"), str(tmp_path / "go")

  proc = _worker(workdir, "--pause_at", "3", "--go_file", go)  # paused before step 3.
  _wait_for(proc, "PAUSED")
  proc.send_signal(signal.SIGTERM)
  open(go, "w").close()
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert '"preempted": true' in out and '"step": 3' in out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
  os.remove(go)

  proc = _worker(workdir, "--pause_at", "3", "--go_file", go)  # steps 4, 5 run, then paused.
  _wait_for(proc, "PAUSED")
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  train, _ = _train_rows(workdir)
  assert 4 in train and 6 not in train
  # Checkpoint 4 may or may not have been committed when the kill came; either is a valid resume.
  assert trainer.checkpoint_lib.CheckpointManager(
      os.path.join(workdir, "checkpoints")).latest_step() in (3, 4)

  proc = _worker(workdir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  final, expected = _flat(_params(workdir, STEPS)), _flat(_params(reference, STEPS))
  for key in expected:
    np.testing.assert_array_equal(final[key], expected[key], err_msg=key)
  train_ref, _ = _train_rows(reference)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = {}
    for line in f:
      row = json.loads(line)
      last[row["step"]] = row["loss"]  # the redone step 5 overwrites the lost one.
  assert [last[s] for s in range(1, STEPS + 1)] == [train_ref[s]["loss"] for s in range(1, STEPS + 1)]


@pytest.mark.parametrize("poisoned_batch,checkpoints", [(4, ["2"]), (1, [])])
def test_non_finite_loss_stops_with_step_and_terms(monkeypatch, tmp_path, poisoned_batch,
                                                   checkpoints):
  make = data_lib.make_train_iterator

  class Poisoned:

    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      batch = next(self.inner)
      self.count += 1
      if self.count == poisoned_batch:
        batch = dict(batch, images=batch["images"] * np.nan)
      return batch

    def __getattr__(self, name):
      return getattr(self.inner, name)

  monkeypatch.setattr(data_lib, "make_train_iterator", lambda *a, **k: Poisoned(make(*a, **k)))
  config = train_worker.small_config()
  with pytest.raises(FloatingPointError) as error:
    trainer.train_and_evaluate(config, str(tmp_path), mesh=sharding.make_mesh(jax.devices()[:1]))
  message = str(error.value)
  # metrics.jsonl numbers the updates before the poisoned one 1, 2, ...: the message uses the
  # number it would give the poisoned update.
  logged = sorted(_train_rows(str(tmp_path))[0]) if poisoned_batch > 1 else []
  assert logged == list(range(1, poisoned_batch))
  assert f"non-finite loss at step {poisoned_batch} " in message
  assert "loss_ce=nan" in message and "loss_bbox=" in message and "loss_giou_0=" in message
  if checkpoints:
    assert f"last good checkpoint in {tmp_path / 'checkpoints'} is step 2" in message
  else:
    assert "no checkpoint was written yet" in message and "None" not in message
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == checkpoints
  for step in checkpoints:
    for value in _flat(_params(str(tmp_path), int(step))).values():
      assert np.isfinite(value).all()


def test_batch_not_divisible_by_devices_names_both_numbers(tmp_path):
  config = train_worker.small_config()
  config.train.global_batch_size = 6
  with pytest.raises(ValueError, match=r"global_batch_size=6 .*number of devices 8"):
    trainer.train_and_evaluate(config, str(tmp_path), mesh=sharding.make_mesh())


def test_eval_batch_the_devices_cannot_split_is_an_error_before_training(tmp_path):
  # It stopped the run only at the evaluation, after the whole training (eval_every=-1).
  config = train_worker.small_config(eval_every=-1)
  config.eval.batch_size = 6
  with pytest.raises(ValueError, match=r"eval.batch_size=6 .*number of devices 8"):
    trainer.train_and_evaluate(config, str(tmp_path), mesh=sharding.make_mesh())
  assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(
      tmp_path / "metrics.jsonl")


def test_workdir_that_is_a_file_is_an_error_naming_it(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("keep me")
  with pytest.raises(ValueError, match=r"workdir .*a_file' is a file, not a folder"):
    trainer.train_and_evaluate(train_worker.small_config(), str(path),
                               mesh=sharding.make_mesh(jax.devices()[:1]))
  assert path.read_text() == "keep me"
  # A workdir below a file cannot be created: a user error naming it, not an OSError traceback.
  with pytest.raises(errors.InvalidInputError, match=r"workdir .*a_file/run' cannot be created: Not a directory"):
    trainer.train_and_evaluate(train_worker.small_config(), str(path / "run"),
                               mesh=sharding.make_mesh(jax.devices()[:1]))
  assert path.read_text() == "keep me"


def test_second_run_on_a_workdir_in_use_is_an_error_naming_the_first(tmp_path):
  workdir = str(tmp_path / "busy")
  os.makedirs(workdir)
  holder = trainer._lock_workdir(workdir)  # another run (here: this process) holds it.
  try:
    with pytest.raises(ValueError, match=rf"workdir .*busy' is in use by another training run "
                                         rf"\(pid {os.getpid()}\)"):
      trainer.train_and_evaluate(train_worker.small_config(), workdir,
                                 mesh=sharding.make_mesh(jax.devices()[:1]))
  finally:
    os.close(holder)
  assert os.listdir(workdir) == [trainer.LOCK_FILE]  # nothing written by the refused run.
  trainer.os.close(trainer._lock_workdir(workdir))  # released: free again.


def test_a_new_batch_shape_is_announced_once(capsys):
  shapes = trainer._NewShapes()
  assert not shapes.check(1, (8, 64, 64, 3))  # the first compile is expected: no line
  assert shapes.check(2, (8, 48, 64, 3))
  assert not shapes.check(3, (8, 48, 64, 3)) and not shapes.check(4, (8, 64, 64, 3))
  assert shapes.check(5, (8, 64, 48, 3))  # rectangular buckets: H and W both count
  lines = capsys.readouterr().out.splitlines()  # printed above the progress bar
  assert len(lines) == 2
  for line, (step, size, count) in zip(lines, [(2, "48x64", 2), (5, "64x48", 3)]):
    assert line.startswith(f"step {step}: ") and f" {size} px" in line, line
    assert "compiling" in line and f"shape {count} " in line, line


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_interrupts():
  # From Python's own handler, as in train.py started from a terminal (a process started in the
  # background by a non-interactive shell, as `nohup make test &`, inherits SIGINT ignored).
  original = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    preemption = trainer._Preemption(every=1)
    try:
      signal.raise_signal(signal.SIGINT)
      assert preemption.requested(1)
      with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    finally:
      preemption.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, original)


def test_resume_drops_the_rows_logged_after_the_checkpoint(tmp_path):
  from tensorboard.compat.proto import event_pb2
  from ddetr_jax import metric_writer
  writer = metric_writer.MetricWriter(str(tmp_path), enabled=True)
  for step in range(1, 9):
    writer.write(step, "train", {"loss": float(step)})
  writer.write(4, "eval", {"AP": 0.5})
  writer.write(8, "eval", {"AP": 0.6})
  writer.close()
  resumed = metric_writer.MetricWriter(str(tmp_path), enabled=True)
  resumed.resume_at(5)
  resumed.write(6, "train", {"loss": 60.0})
  resumed.close()
  assert [(r["step"], r["kind"]) for r in resumed.rows()] == [
      (1, "train"), (2, "train"), (3, "train"), (4, "train"), (5, "train"), (4, "eval"),
      (6, "train")]
  starts = []
  for name in os.listdir(tmp_path / "tensorboard"):
    data = (tmp_path / "tensorboard" / name).read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log"):
        starts.append((event.step, event.session_log.status))
  assert starts == [(6, event_pb2.SessionLog.START)]  # TensorBoard purges steps >= 6 before it.
  from tensorboard.backend.event_processing import event_accumulator
  shown = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  shown.Reload()
  assert [(e.step, e.value) for e in shown.Scalars("train/loss")] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]
  assert [(e.step, e.value) for e in shown.Scalars("eval/AP")] == [(4, 0.5)]


def test_summary_quotes_a_workdir_with_spaces(one_device_run, tmp_path):
  done, metrics = one_device_run
  spaced = str(tmp_path / "my run")
  shutil.copytree(done, spaced)
  summary = trainer.final_summary(spaced, metrics)
  assert f"tensorboard --logdir '{spaced}/tensorboard'" in summary


def test_resume_into_a_config_it_does_not_fit_names_parameters(one_device_run, tmp_path):
  workdir, _ = one_device_run
  shutil.copytree(os.path.join(workdir, "checkpoints"), tmp_path / "checkpoints")
  config = train_worker.small_config()
  config.model.num_classes = 7
  with pytest.raises(ValueError, match=r"class_embed/kernel checkpoint \(32, 5\) vs model \(32, 7\)"):
    trainer.train_and_evaluate(config, str(tmp_path), mesh=sharding.make_mesh(jax.devices()[:1]))


@pytest.mark.parametrize("setting, value", [("freeze_stem", False), ("grad_accum_steps", 2)])
def test_resume_with_other_optimizer_settings_is_one_short_error(one_device_run, tmp_path,
                                                                 setting, value):
  workdir, _ = one_device_run
  shutil.copytree(os.path.join(workdir, "checkpoints"), tmp_path / "checkpoints")
  config = train_worker.small_config(num_steps=STEPS + 1)
  assert config.optim[setting] != value
  config.optim[setting] = value
  with pytest.raises(ValueError, match=r"checkpoint .*: its optimizer state \(optim settings "
                                       r"changed\?\) does not fit this config") as info:
    trainer.train_and_evaluate(config, str(tmp_path), mesh=sharding.make_mesh(jax.devices()[:1]))
  assert len(str(info.value)) < 1000 and "\n" not in str(info.value), str(info.value)


def test_init_checkpoint_loads_a_backbone_only_checkpoint_and_rejects_misfits(one_device_run,
                                                                             tmp_path):
  import orbax.checkpoint as ocp
  workdir, _ = one_device_run
  trained = _params(workdir, STEPS)
  config = train_worker.small_config()
  fresh = jax.tree.map(np.zeros_like, trained)
  path = str(tmp_path / "backbone_only")
  ocp.PyTreeCheckpointer().save(path, trained["backbone"])  # bare ResNet tree (no 'backbone' key)
  merged = _flat(trainer.load_init_checkpoint(path, config, fresh))
  expected = _flat(trained)
  for key, value in merged.items():
    if key.startswith("backbone/"):
      np.testing.assert_array_equal(value, expected[key], err_msg=key)
    else:
      assert not value.any(), key  # kept from `fresh`
  bad = dict(trained, bbox_embed=dict(trained["bbox_embed"], layers_2=dict(
      trained["bbox_embed"]["layers_2"], kernel=np.zeros((32, 6), np.float32))))
  bad_path = str(tmp_path / "bad")
  ocp.PyTreeCheckpointer().save(bad_path, bad)
  with pytest.raises(ValueError, match=r"init_checkpoint .*bbox_embed/layers_2/kernel checkpoint "
                                       r"\(32, 6\) vs model \(32, 4\)"):
    trainer.load_init_checkpoint(bad_path, config, fresh)


def test_init_checkpoint_with_other_classes_keeps_fresh_class_heads(one_device_run, tmp_path,
                                                                    capsys):
  import orbax.checkpoint as ocp
  workdir, _ = one_device_run
  trained = _params(workdir, STEPS)
  config = train_worker.small_config()
  fresh = jax.tree.map(lambda x: np.full_like(x, 7.0), trained)
  other = dict(trained, class_embed={"kernel": np.ones((32, 91), np.float32),
                                     "bias": np.ones((91,), np.float32)})
  path = str(tmp_path / "coco_classes")
  ocp.PyTreeCheckpointer().save(path, other)
  merged = _flat(trainer.load_init_checkpoint(path, config, fresh))
  expected = _flat(trained)
  assert merged.keys() == expected.keys()
  for key, value in merged.items():
    if key.startswith("class_embed/"):
      assert (value == 7.0).all() and value.shape == expected[key].shape, key
    else:
      np.testing.assert_array_equal(value, expected[key], err_msg=key)
  assert ("class heads (2 arrays, 91 classes) do not match config.model.num_classes=5"
          in capsys.readouterr().out)


@pytest.mark.parametrize("suffix", [".bin", ".pth.tar", ".safetensors"])
def test_init_checkpoint_from_a_torch_file_with_other_classes(tmp_path, suffix):
  from configs import tiny
  from ddetr_jax import convert
  from tests.test_model_hf_reference import build_hf_model
  config = tiny.get_config("box_refine")
  hf = build_hf_model(config.model, seed=3)  # config.model.num_classes (5) classes.
  path = str(tmp_path / ("hf" + suffix))
  state_dict = {k: v.clone() for k, v in hf.state_dict().items()}  # no shared storage.
  if suffix != ".safetensors":
    import torch
    torch.save(state_dict, path)
  else:
    from safetensors.torch import save_file
    save_file(state_dict, path)
  reference = _flat(convert.load_torch_params(path, config))
  config.model.num_classes = 3  # fine-tuning on another label set.
  shapes = convert.expected_param_shapes(config)
  fresh = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), shapes)
  merged = _flat(trainer.load_init_checkpoint(path, config, fresh))
  assert merged.keys() == reference.keys()
  heads = [k for k in merged if k.startswith("class_embed")]
  assert len(heads) == 2 * config.model.dec_layers
  for key, value in merged.items():
    if key in heads:
      assert value.shape[-1] == 3 and (value == 7.0).all(), key
    else:
      np.testing.assert_array_equal(value, reference[key], err_msg=key)


@pytest.mark.parametrize("log_every", [1, 3])
def test_images_per_sec_counts_each_step_once_and_not_evaluation(monkeypatch, tmp_path,
                                                                  log_every):
  """A clock that moves 1 s per train step and 100 s per evaluation: every logged window,
  including those cut short by a checkpoint save or an evaluation, must read exactly
  global_batch_size images per second."""
  clock = [0.0]
  monkeypatch.setattr(trainer, "_now", lambda: clock[0])
  real_jit, real_evaluate = trainer.jit_train_step, trainer.evaluator.evaluate

  def timed_jit(*args, **kwargs):
    step = real_jit(*args, **kwargs)

    def run(*a):
      out = step(*a)
      clock[0] += 1.0
      return out
    return run

  def timed_evaluate(*args, **kwargs):
    clock[0] += 100.0
    return real_evaluate(*args, **kwargs)

  monkeypatch.setattr(trainer, "jit_train_step", timed_jit)
  monkeypatch.setattr(trainer.evaluator, "evaluate", timed_evaluate)
  config = train_worker.small_config(num_steps=5, eval_every=3)
  config.train.checkpoint_every = 2
  config.train.log_every = log_every
  trainer.train_and_evaluate(config, str(tmp_path), mesh=sharding.make_mesh(jax.devices()[:1]))
  rows, evals = _train_rows(str(tmp_path))
  assert sorted(rows) == [s for s in range(1, 6) if s % log_every == 0 or s == 5]
  assert [r["step"] for r in evals] == [3, 5]
  for step, row in rows.items():
    assert row["images_per_sec"] == pytest.approx(config.train.global_batch_size), (step, row)


def test_a_failing_evaluation_mid_run_keeps_the_steps_trained(monkeypatch, tmp_path):
  # An evaluation at step 3 (eval_every=3) raises, e.g. because no validation image decodes:
  # the error reaches the user and step 3 is saved, not only step 2's checkpoint.
  def failing_evaluate(*args, **kwargs):
    raise data_lib.CorruptImageError("none of the 8 images of the 'val' split could be decoded")

  monkeypatch.setattr(trainer.evaluator, "evaluate", failing_evaluate)
  config = train_worker.small_config(num_steps=5, eval_every=3)
  config.train.checkpoint_every = 2
  with pytest.raises(data_lib.CorruptImageError, match="could be decoded"):
    trainer.train_and_evaluate(config, str(tmp_path), mesh=sharding.make_mesh(jax.devices()[:1]))
  assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [2, 3]


def test_preempted_run_summary_lists_only_the_files_it_wrote(one_device_run, monkeypatch,
                                                             tmp_path):
  monkeypatch.setattr(trainer._Preemption, "requested", lambda self, step: True)  # SIGTERM now.
  workdir = str(tmp_path)
  result = trainer.train_and_evaluate(train_worker.small_config(eval_every=-1), workdir,
                                      mesh=sharding.make_mesh(jax.devices()[:1]))
  assert result == {"step": 1, "preempted": True}
  summary = trainer.final_summary(workdir, result)
  for name in ("training_curves.png", "coco_metrics.json"):
    assert not os.path.exists(os.path.join(workdir, name))
    assert name not in summary
  for name in ("metrics.jsonl", "tensorboard", "checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)) and os.path.join(workdir, name) in summary
  assert "run the same command to resume" in summary and "COCO AP" not in summary
  done, metrics = one_device_run  # a complete run: everything listed, with its AP.
  summary = trainer.final_summary(done, metrics)
  for name in ("training_curves.png", "metrics.jsonl", "coco_metrics.json", "tensorboard",
               "checkpoints"):
    assert os.path.join(done, name) in summary
  assert f"COCO AP {metrics['AP']:.4f}" in summary and "resume" not in summary


def _copy_of_finished_run(one_device_run, tmp_path, keep_eval_rows: bool) -> str:
  done, _ = one_device_run
  workdir = str(tmp_path / "run")
  shutil.copytree(done, workdir)
  if not keep_eval_rows:  # killed during the final evaluation: checkpoint 6, no eval row.
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
      lines = [line for line in f if json.loads(line)["kind"] != "eval"]
    with open(path, "w") as f:
      f.writelines(lines)
    os.remove(os.path.join(workdir, "coco_metrics.json"))
  return workdir


def test_rerun_of_a_finished_run_reports_its_eval_without_evaluating_again(one_device_run,
                                                                          tmp_path):
  _, metrics = one_device_run
  workdir = _copy_of_finished_run(one_device_run, tmp_path, keep_eval_rows=True)
  _, evals_before = _train_rows(workdir)
  result = trainer.train_and_evaluate(train_worker.small_config(eval_every=-1), workdir,
                                      mesh=sharding.make_mesh(jax.devices()[:1]))
  _, evals = _train_rows(workdir)
  assert evals == evals_before and [e["step"] for e in evals] == [STEPS]
  assert result["step"] == STEPS
  for name in evaluator.METRIC_NAMES:
    assert result[name] == pytest.approx(metrics[name]), name


def test_rerun_of_a_run_killed_during_its_final_eval_evaluates(one_device_run, tmp_path):
  _, metrics = one_device_run
  workdir = _copy_of_finished_run(one_device_run, tmp_path, keep_eval_rows=False)
  result = trainer.train_and_evaluate(train_worker.small_config(eval_every=-1), workdir,
                                      mesh=sharding.make_mesh(jax.devices()[:1]))
  _, evals = _train_rows(workdir)
  assert [e["step"] for e in evals] == [STEPS]
  with open(os.path.join(workdir, "coco_metrics.json")) as f:
    assert json.load(f)["step"] == STEPS
  for name in evaluator.METRIC_NAMES:  # the same params evaluate to the same numbers.
    assert result[name] == pytest.approx(metrics[name]), name
