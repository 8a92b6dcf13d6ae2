"""The training loop: one jitted, sharded train step; checkpoints, monitoring and evaluation.

`train_and_evaluate(config, workdir)` trains `build_model(config)` on config.data and evaluates
it with COCO AP. Everything it writes is in `workdir`:
  checkpoints/          orbax steps (checkpoint.py), resumed from automatically
  metrics.jsonl         one JSON object a line: {"step", "kind": "train", "loss", "loss_ce", ...,
                        "lr", "images_per_sec", "grad_norm"} every config.train.log_every steps
                        and {"step", "kind": "eval", "AP", "AP50", ...} after each evaluation
  tensorboard/          the same scalars as TensorBoard events ("train/loss", "eval/AP", ...)
  training_curves.png   loss curve and eval AP/AP50 over steps
  coco_metrics.json     the last evaluation (evaluator.py)
`final_summary(workdir, result)` lists what a run left there (train.py prints it).

The step (`make_train_step`): forward with dropout rng = fold_in(base rng, step), the set
criterion with the in-graph matcher, grads, the optax update. Params, optimizer state, step and
rng are replicated over the mesh's 'data' axis and donated; the batch is split over 'data'.
Config fields used: model.* (the model), loss.* (criterion), optim.* (optimizer),
train.global_batch_size, epochs, num_train_steps (-1: epochs * steps per epoch), seed,
log_every, checkpoint_every, keep_checkpoints, eval_every (N > 0: every N steps and at the
end; -1: only at the end; 0: never), init_checkpoint; data.*, eval.* (data pipeline, evaluator).

Stops: a non-finite loss raises FloatingPointError naming the step (numbered as in metrics.jsonl:
step s is the update from s - 1 to s), every loss term and the last good checkpoint (nothing is
saved after it); SIGTERM (preemption) saves a checkpoint at the current step and returns
{"step", "preempted": True} without evaluating. A run started on a workdir whose run is complete
(checkpoint at the last step) evaluates only if metrics.jsonl has no eval row for that step;
otherwise it returns the stored metrics.
"""
import fcntl
import logging
import math
import os
import re
import shlex
import signal
import time
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ddetr_jax import checkpoint as checkpoint_lib
from ddetr_jax import data as data_lib
from ddetr_jax import errors
from ddetr_jax import evaluator
from ddetr_jax import grouped_adamw
from ddetr_jax import losses
from ddetr_jax import metric_writer
from ddetr_jax import optim
from ddetr_jax import output_folder
from ddetr_jax import sharding as sharding_lib
from ddetr_jax.data import batching
from ddetr_jax.models import build_model


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  Attributes:
    step: int32 scalar, train steps done.
    params: the model's 'params' pytree.
    opt_state: the optax state.
    rng: uint32 [2] base PRNG key; step s uses fold_in(rng, s).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def make_train_step(model, tx: optax.GradientTransformation, loss_config: Any,
                    num_classes: int, freeze_stem: bool = True) -> Callable:
  """(state, batch) -> (state, metrics), not yet jitted.

  batch: `images` [B, H, W, 3], `padding_mask` [B, H, W], `boxes` [B, T, 4], `labels` [B, T],
  `box_mask` [B, T] (the global batch). metrics: `loss` (weighted total), the unweighted terms of
  `losses.set_criterion` (`loss_ce`, `loss_bbox`, `loss_giou`, `loss_ce_0`, ...), `grad_norm`
  (global norm of the trainable gradients before clipping, as `optim.param_labels(...,
  freeze_stem)` defines them), `num_boxes`.
  """
  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      outputs = model.apply({"params": params}, batch["images"], batch["padding_mask"],
                            train=True, rngs={"dropout": step_rng})
      return losses.set_criterion(outputs, batch, loss_config, num_classes)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = grouped_adamw.trainable_global_norm(grads, optim.param_labels(grads, freeze_stem))
    metrics = dict(terms, loss=loss, grad_norm=grad_norm,
                   num_boxes=batch["box_mask"].sum())
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, mesh, state_shapes: TrainState) -> Callable:
  """jax.jit with the state replicated and donated, the batch split over 'data'."""
  replicated = sharding_lib.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, state_shapes)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def seed_rngs(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(init rng, base train rng), uint32 [2] each, from config.train.seed."""
  init_rng, train_rng = np.asarray(jax.random.split(jax.random.PRNGKey(seed)))
  return init_rng, train_rng


def init_params(model, config, rng: jax.Array, mesh) -> Any:
  """Freshly initialised params, replicated on the mesh."""
  image_shape, mask_shape = batching.init_shapes(config.data)

  def init(key):
    return model.init(key, jnp.zeros(image_shape, jnp.float32), jnp.zeros(mask_shape, bool),
                      train=False)["params"]

  replicated = sharding_lib.replicated(mesh)
  return jax.jit(init, in_shardings=replicated, out_shardings=replicated)(np.asarray(rng))


def abstract_params(model, config) -> Any:
  """The params tree as ShapeDtypeStructs (no computation).

  This is the first trace of the model, where its modules check the values `config.model`
  gave them (a ResNet depth, a sampler impl, a hidden size GroupNorm cannot split) and raise
  errors.InvalidInputError for one they cannot use.
  """
  image_shape, mask_shape = batching.init_shapes(config.data)
  return jax.eval_shape(
      lambda key: model.init(key, jnp.zeros(image_shape, jnp.float32),
                             jnp.zeros(mask_shape, bool), train=False)["params"],
      jax.random.PRNGKey(0))


_CLASS_HEAD = re.compile(r"class_embed(_\d+)?/")


def _read_torch_init_checkpoint(path: str, config) -> dict:
  """Flax params from a PyTorch file, converted at the checkpoint's own number of classes.

  The conversion checks every shape against the model `config` builds; a checkpoint trained on
  another label set (COCO's 91 classes, fine-tuning on K) differs from it only in the class
  heads, so it is converted with `config.model.num_classes` set to the checkpoint's count and
  `load_init_checkpoint` then leaves those heads freshly initialised.
  """
  from ddetr_jax import convert  # pylint: disable=g-import-not-at-top
  state_dict = convert.read_state_dict(path)
  convert_config = config
  try:
    official, _ = convert.to_official_names(state_dict)
    bias = official.get("class_embed.0.bias")
    if bias is not None and bias.shape[0] != config.model.num_classes:
      convert_config = config.copy_and_resolve_references()
      convert_config.model.num_classes = int(bias.shape[0])
    return convert.params_from_state_dict(state_dict, convert_config)
  except convert.CheckpointError as e:
    raise convert.with_path(e, path) from None


def load_init_checkpoint(path: str, config, params: Any) -> Any:
  """Fine-tuning start: `params` with every leaf found in the checkpoint at `path` replaced.

  Args:
    path: an orbax params checkpoint folder (`evaluator.load_params` layouts; full model, or
      partial such as {'backbone': ...} or a bare ResNet tree) or a PyTorch or safetensors file
      (any name, e.g. .pth, .pth.tar, .ckpt, .bin, .safetensors; read by `ddetr_jax.convert`).
    config: the full config (for the torch conversion).
    params: the freshly initialised params; leaves absent from the checkpoint keep these values.

  The classification heads (`class_embed*`) of a checkpoint with another number of classes than
  `config.model.num_classes` are not loaded: they keep their fresh initialisation (the usual
  DETR fine-tuning on a new label set), and the log says so.

  Raises:
    errors.InvalidInputError (a ValueError) naming every checkpoint parameter that the model
    lacks or has with another shape (other than those class heads).
  """
  if os.path.isfile(path):  # orbax checkpoints are folders.
    loaded = _read_torch_init_checkpoint(path, config)
  else:
    loaded = evaluator.load_params(path)
  if "backbone" not in loaded and "conv1" in loaded:  # a bare backbone checkpoint.
    loaded = {"backbone": loaded}
  want = checkpoint_lib.flat_shapes(params)
  flat_loaded = {checkpoint_lib.param_path(p): v
                 for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  other_classes = sorted(k for k, v in flat_loaded.items()
                         if _CLASS_HEAD.match(k) and k in want and np.shape(v) != want[k])
  class_note = ""
  if other_classes:
    counts = sorted({np.shape(flat_loaded[k])[-1] for k in other_classes})
    class_note = (f"; its class heads ({len(other_classes)} arrays, {'/'.join(map(str, counts))} "
                  f"classes) do not match config.model.num_classes={config.model.num_classes} "
                  f"and keep their fresh initialisation")
    loaded = jax.tree_util.tree_map_with_path(
        lambda p, v: None if checkpoint_lib.param_path(p) in other_classes else v, loaded)
    for key in other_classes:
      del flat_loaded[key]
  checkpoint_lib.check_tree_fits(params, loaded, f"train.init_checkpoint {path!r}",
                                 allow_missing=True)
  count = [0, 0]

  def pick(path, value):
    key = checkpoint_lib.param_path(path)
    if key in flat_loaded:
      count[0] += 1
      return jnp.asarray(flat_loaded[key], value.dtype)
    count[1] += 1
    return value

  merged = jax.tree_util.tree_map_with_path(pick, params)
  _announce(f"init_checkpoint {path}: loaded {count[0]} arrays, kept {count[1]} freshly "
            f"initialised{class_note}")
  return merged


class _Preemption:
  """Records SIGTERM and a first Ctrl-C (SIGINT); `requested(step)` is agreed by all processes
  (checked every `every` steps). A second Ctrl-C interrupts at once (KeyboardInterrupt)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, every: int):
    self.flag = False
    self.every = max(1, every)
    self._previous = {}
    try:
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    except ValueError:  # not the main thread: no signal handling.
      pass

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      _announce("interrupted (Ctrl-C): saving a checkpoint after this step, then stopping; "
                "Ctrl-C again stops at once")
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
    else:
      logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.flag = True

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.flag
    if step % self.every:
      return False
    flags = multihost_utils.process_allgather(np.array([self.flag]))
    return bool(np.any(flags))

  def restore(self):
    for signum, previous in self._previous.items():
      if previous is not None:
        signal.signal(signum, previous)


class _NewShapes:
  """Tells the user when a batch shape arrives that the train step has not run yet: jit compiles
  the step for it, so the progress bar stalls (with rectangular buckets a COCO run meets a few
  dozen shapes, see data/batching.py). The first shape compiles before any step is expected."""

  def __init__(self):
    self.seen = set()

  def check(self, step: int, shape: tuple) -> bool:
    """True (and a line for the user) when `shape` [B, H, W, 3] is new and not the first."""
    key = tuple(shape[1:3])
    if key in self.seen:
      return False
    self.seen.add(key)
    if len(self.seen) == 1:
      return False
    _announce(f"step {step}: first batch of {key[0]}x{key[1]} px: compiling the train step for "
              f"it (batch shape {len(self.seen)} of this run)")
    return True


def _now() -> float:
  """Seconds on a monotonic clock (the throughput windows; a function so tests can drive it)."""
  return time.monotonic()


def _announce(message: str) -> None:
  """A line for the user (printed above the progress bar by process 0) and the log."""
  logging.info(message)
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def _steps_per_epoch(config) -> int:
  source = data_lib.build_source(config.data, "train", num_classes=config.model.num_classes)
  return max(1, len(source) // int(config.train.global_batch_size))


def _format_terms(metrics: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())


def _stored_eval(writer: metric_writer.MetricWriter, step: int) -> Optional[dict]:
  """The metrics of metrics.jsonl's last eval row at `step`, or None if it has none.

  Every process gets the same answer (evaluation has collectives); processes other than 0, which
  do not read the file, get {} instead of the metrics.
  """
  rows = [r for r in writer.rows() if r["kind"] == "eval" and r["step"] == step]
  found = bool(rows)
  if jax.process_count() > 1:  # all processes must agree: evaluation has collectives.
    found = bool(multihost_utils.broadcast_one_to_all(np.array(found)))
  if not found:
    return None
  return {k: v for k, v in rows[-1].items() if k not in ("step", "kind")} if rows else {}


def final_summary(workdir: str, result: Mapping[str, Any]) -> str:
  """What train.py prints at the end: the step, COCO AP if evaluated, and the files in `workdir`.

  Args:
    workdir: the run's directory (see the module doc for its layout).
    result: what `train_and_evaluate` returned (`step`, `preempted`, `AP`, `AP50`, `AP75`).

  Returns:
    lines naming the plot, metrics.jsonl, coco_metrics.json and TensorBoard directory where they
    exist (a preempted run may have written none of them), the checkpoint directory, and for a
    preempted run how to resume.
  """
  def path(name):
    return os.path.join(workdir, name)

  lines = [f"finished at step {result.get('step')}"
           + (" (preempted: run the same command to resume)" if result.get("preempted") else "")]
  if "AP" in result:
    lines.append(f"COCO AP {result['AP']:.4f}  AP50 {result['AP50']:.4f}  "
                 f"AP75 {result['AP75']:.4f}")
  if os.path.exists(path("training_curves.png")):
    lines.append(f"plot:        {path('training_curves.png')}")
  metrics = [f"{path(name)} ({what})" for name, what in
             (("metrics.jsonl", "train"), ("coco_metrics.json", "COCO eval"))
             if os.path.exists(path(name))]
  if metrics:
    lines.append("metrics:     " + ", ".join(metrics))
  if os.path.isdir(path("tensorboard")):
    lines.append(f"tensorboard: tensorboard --logdir {shlex.quote(path('tensorboard'))}")
  lines.append(f"checkpoints: {path('checkpoints')}")
  return "\n".join(lines)


def train_and_evaluate(config, workdir: str, mesh: Optional[Mesh] = None) -> dict:
  """Trains `build_model(config)` (resuming from workdir/checkpoints) and evaluates it.

  Args:
    config: a full config (configs/deformable_detr.py schema).
    workdir: output directory (see the module doc).
    mesh: the device mesh (axis 'data'); default all devices of all processes.

  Returns:
    the last evaluation's metrics (AP, AP50, ... from evaluator.evaluate, or for a complete
    run started again those of its eval row in metrics.jsonl) plus `step` and `train_loss` (mean
    loss of the last logging window; nan if no step was trained); {"step", "preempted": True}
    when stopped by SIGTERM or Ctrl-C.

  Process 0 holds an exclusive lock on WORKDIR/.train.lock for the run: a second run started on
  the same workdir stops with errors.InvalidInputError naming the first one's pid.
  """
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  shown = f"workdir {workdir!r}"
  if not is_main:  # process 0 makes the folder; the others only refuse a file in its place.
    output_folder.refuse_non_folder(workdir, shown)
    return _train_and_evaluate(config, workdir, mesh)
  output_folder.make(workdir, shown)
  try:
    lock = _lock_workdir(workdir)  # its InvalidInputError (a ValueError) passes through.
  except OSError as e:  # no permission, a read-only file system...
    raise errors.InvalidInputError(
        f"cannot use workdir {workdir!r}: {e.strerror or e} ({e.filename or workdir})") from None
  try:
    return _train_and_evaluate(config, workdir, mesh)
  finally:
    os.close(lock)  # releases the lock.


LOCK_FILE = ".train.lock"


def _lock_workdir(workdir: str) -> int:
  """An open descriptor of WORKDIR/.train.lock, exclusively locked (flock) and holding our pid.

  Raises:
    errors.InvalidInputError naming the pid of the run that holds the lock.
  """
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:  # BlockingIOError: another open file holds it.
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    os.close(fd)
    raise errors.InvalidInputError(
        f"workdir {workdir!r} is in use by another training run (pid {holder}); wait for it or "
        f"stop it, or use another --workdir") from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, str(os.getpid()).encode(), 0)
  return fd


def _train_and_evaluate(config, workdir: str, mesh: Optional[Mesh]) -> dict:
  """`train_and_evaluate` once the workdir exists (and is locked by process 0)."""
  is_main = jax.process_index() == 0
  tc = config.train
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  global_batch = int(tc.global_batch_size)
  sharding_lib.check_batch_divisible(global_batch, mesh, "train.global_batch_size")

  steps_per_epoch = _steps_per_epoch(config)
  eval_every = int(tc.get("eval_every", -1))
  if eval_every != 0:  # now, not at the first evaluation (after the training, by default).
    sharding_lib.check_batch_divisible(int(config.eval.batch_size), mesh, "eval.batch_size")
    data_lib.check_image_files(config, "val")
  num_steps = int(tc.num_train_steps) if tc.num_train_steps > 0 else int(tc.epochs) * steps_per_epoch
  accum = int(config.optim.get("grad_accum_steps", 1) or 1)
  lr_schedule = optim.learning_rate_schedule(config.optim.lr, config.optim.lr_drop,
                                             max(1, steps_per_epoch // accum))
  model = build_model(config)
  params_shapes = abstract_params(model, config)
  tx = optim.make_optimizer(config.optim, steps_per_epoch, params_shapes)
  replicated = sharding_lib.replicated(mesh)

  def with_sharding(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)

  opt_shapes = jax.eval_shape(tx.init, params_shapes)
  manager = checkpoint_lib.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                             keep=int(tc.keep_checkpoints))
  latest = manager.latest_step()
  data_state = None
  if latest is not None:
    try:
      restored = manager.restore(latest, with_sharding(params_shapes), with_sharding(opt_shapes))
    except Exception:
      manager.close()
      raise
    state = TrainState(step=np.asarray(latest, np.int32), params=restored["params"],
                       opt_state=restored["opt_state"], rng=restored["rng"])
    data_state = restored["data_state"] or None
    _announce(f"resumed from {manager.directory} at step {latest}")
  else:
    init_rng, train_rng = seed_rngs(int(tc.seed))
    params = init_params(model, config, init_rng, mesh)
    if tc.init_checkpoint:
      params = load_init_checkpoint(str(tc.init_checkpoint), config, params)
    state = TrainState(step=np.asarray(0, np.int32), params=params,
                       opt_state=jax.jit(tx.init, out_shardings=replicated)(params), rng=train_rng)
  state = sharding_lib.replicate(state, mesh)
  start_step = int(jax.device_get(state.step))

  train_step = jit_train_step(
      make_train_step(model, tx, config.loss, int(config.model.num_classes),
                      bool(config.optim.get("freeze_stem", True))), mesh, state)
  writer = metric_writer.MetricWriter(workdir, enabled=is_main)
  if latest is not None:
    writer.resume_at(start_step)  # the steps after the checkpoint are logged again.
  log_every = max(1, int(tc.log_every))
  checkpoint_every = int(tc.checkpoint_every)
  last_eval: dict = {}
  window: dict = {}
  window_loss = float("nan")
  iterator = data_lib.make_train_iterator(config, mesh, start_state=data_state)
  progress = tqdm.tqdm(total=num_steps, initial=start_step, desc="train", unit="step",
                       disable=not is_main, dynamic_ncols=True)
  preemption = _Preemption(log_every)  # last before the try: its finally restores the handlers.

  def save(step: int):
    manager.save(step, state.params, state.opt_state, state.rng, iterator.get_state())

  def run_eval(step: int):
    nonlocal last_eval
    metrics = evaluator.evaluate(model, state.params, config, mesh=mesh, workdir=workdir,
                                 step=step)
    last_eval = dict(metrics)
    writer.write(step, "eval", {k: v for k, v in metrics.items() if k != "step"})
    writer.plot()

  try:
    # (step number after the update, device metrics, _now() when train_step returned): checked
    # one step late. The window's time runs between those return times, never between
    # fetches: with synchronous dispatch a fetch one step late comes a whole step after its
    # step ended, except where a save or an eval forces it at once.
    pending = None
    window_start, window_steps = _now(), 0

    def check(step_done: int, device_metrics, returned: float) -> None:
      nonlocal window, window_start, window_steps, window_loss
      host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if not all(math.isfinite(v) for v in host.values()):
        manager.wait()  # a save still in flight counts as written.
        latest = manager.latest_step()
        kept = (f"no checkpoint was written yet in {manager.directory}" if latest is None else
                f"the last good checkpoint in {manager.directory} is step {latest}")
        raise FloatingPointError(
            f"non-finite loss at step {step_done} (the update from step {step_done - 1}, "
            f"numbered as in metrics.jsonl): {_format_terms(host)}; {kept}")
      for k, v in host.items():
        window[k] = window.get(k, 0.0) + v
      window_steps += 1
      if step_done % log_every == 0 or step_done == num_steps:
        elapsed = max(returned - window_start, 1e-9)
        scalars = {k: v / window_steps for k, v in window.items()}
        scalars["lr"] = float(lr_schedule((step_done - 1) // accum))
        scalars["images_per_sec"] = window_steps * global_batch / elapsed
        window_loss = scalars["loss"]
        writer.write(step_done, "train", scalars)
        progress.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}",
                             img_s=f"{scalars['images_per_sec']:.1f}", refresh=False)
        window, window_steps, window_start = {}, 0, returned

    new_shapes = _NewShapes()
    for step in range(start_step, num_steps):
      batch = next(iterator)
      new_shapes.check(step + 1, batch["images"].shape)
      state, metrics = train_step(state, {k: batch[k] for k in data_lib.DEVICE_KEYS})
      returned = _now()
      if pending is not None:
        check(*pending)
      pending = (step + 1, metrics, returned)
      progress.update(1)
      step_done = step + 1
      stop = preemption.requested(step_done)
      if stop or (checkpoint_every > 0 and step_done % checkpoint_every == 0) \
          or step_done == num_steps:
        check(*pending)
        pending = None
        save(step_done)
      if stop:
        manager.wait()
        _announce(f"stopped (a signal): checkpoint saved at step {step_done} in "
                  f"{manager.directory}")
        return {"step": step_done, "preempted": True}
      if eval_every > 0 and step_done % eval_every == 0 and step_done != num_steps:
        if pending is not None:
          check(*pending)
          pending = None
        eval_start = _now()
        try:
          run_eval(step_done)
        except Exception:  # e.g. no validation image decodes: keep the steps trained so far.
          if manager.latest_step() != step_done:
            save(step_done)
          raise
        window_start += _now() - eval_start  # images/s counts training time only.
    if pending is not None:
      check(*pending)
    progress.close()
    manager.wait()
    final_step = int(jax.device_get(state.step))
    if manager.latest_step() != final_step:  # e.g. resumed at the end: nothing new trained.
      save(final_step)
      manager.wait()
    writer.plot()
    if eval_every != 0:
      stored = _stored_eval(writer, final_step) if start_step == final_step else None
      if stored is None:
        run_eval(final_step)
      else:
        last_eval = stored
        _announce(f"step {final_step} was already evaluated (metrics.jsonl): not evaluating again")
    result = dict(last_eval)
    result.update(step=final_step, train_loss=window_loss)
    return result
  finally:
    progress.close()
    preemption.restore()
    manager.wait()
    manager.close()
    writer.close()
    iterator.close()
