"""Training checkpoints: orbax CheckpointManager with params, optimizer state, step, RNG, data state.

Layout of `directory` (normally WORKDIR/checkpoints), one folder per saved step:
  <step>/params/       the model params pytree (what `evaluator.load_params` reads)
  <step>/opt_state/    the optax state pytree
  <step>/train_meta/   JSON {"step": int, "rng": [uint32, ...]} (the step is also the folder name)
  <step>/data_state/   JSON per process: process_<i>-of-<n>.json, that process's
                       `TrainIterator.get_state()`
Orbax writes a step into a temporary folder and renames it when complete, so a process killed
during a save leaves only a `*.orbax-checkpoint-tmp*` folder that is ignored (and removed the next
time a manager opens the directory): the previous step stays the latest usable one.

Restoring checks the stored params against the expected tree first and names every missing,
unexpected or differently shaped parameter (`check_tree_fits`).
"""
import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ddetr_jax import errors

PARAMS, OPT_STATE, TRAIN_META, DATA_STATE = "params", "opt_state", "train_meta", "data_state"


class ProcessJsonHandler(ocp.CheckpointHandler):
  """Each process saves/restores its own JSON-serialisable dict (the data-iterator state)."""

  def _path(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "ProcessJsonSave"):
    self._path(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: Optional["ProcessJsonRestore"] = None) -> Any:
    path = self._path(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
      raise FileNotFoundError(
          f"no data-iterator state {path.name} in {directory} (found {found}): the checkpoint "
          f"was written by a run with a different number of processes")
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    return None

  def structure(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


def param_path(path: tuple) -> str:
  """The string "backbone/conv1/kernel" of a jax key path."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return "/".join(names)


def flat_shapes(tree: Any) -> dict:
  """{'a/b/kernel': shape} of every array-like leaf (arrays, ShapeDtypeStructs, orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {param_path(path): tuple(getattr(leaf, "shape", np.shape(leaf))) for path, leaf in leaves}


def check_tree_fits(expected: Any, found: Any, what: str, allow_missing: bool = False) -> None:
  """Raises errors.InvalidInputError (a ValueError) naming each parameter that does not fit.

  Args:
    expected: the tree the config builds (arrays or ShapeDtypeStructs).
    found: the stored tree (arrays or orbax array metadata with `.shape`).
    what: description of the stored tree for the message (e.g. the checkpoint path).
    allow_missing: if True, parameters of `expected` absent from `found` are allowed (a partial,
      e.g. backbone-only, checkpoint); unexpected and mis-shaped ones are still errors.
  """
  want, have = flat_shapes(expected), flat_shapes(found)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  mismatched = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  problems = []
  if missing and not allow_missing:
    problems.append(f"{len(missing)} missing from the checkpoint: {missing[:20]}")
  if unexpected:
    problems.append(f"{len(unexpected)} not in the model: {unexpected[:20]}")
  if mismatched:
    problems.append(f"{len(mismatched)} with different shapes: " + ", ".join(
        f"{k} checkpoint {have[k]} vs model {want[k]}" for k in mismatched[:20]))
  if problems:
    raise errors.InvalidInputError(f"{what} does not fit this config's model: "
                                   + "; ".join(problems))


class CheckpointManager:
  """Saves and restores the training state in `directory` (see the module doc for the layout).

  Args:
    directory: the checkpoint root (created if needed).
    keep: how many most recent steps to keep (<= 0: all).
    async_save: write in a background thread after copying the arrays to the host (the caller
      may donate/overwrite the state as soon as `save` returns).
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        save_interval_steps=1,  # the trainer decides when to save.
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    handlers = {
        PARAMS: ocp.StandardCheckpointHandler(),
        OPT_STATE: ocp.StandardCheckpointHandler(),
        TRAIN_META: ocp.JsonCheckpointHandler(),
        DATA_STATE: ProcessJsonHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, params: Any, opt_state: Any, rng: Any,
           data_state: Optional[Mapping[str, Any]]) -> None:
    """Saves one step (asynchronously if enabled; `wait` blocks until it is on disk).

    Args:
      step: the number of train steps done; also the folder name.
      params, opt_state: pytrees of (replicated) arrays.
      rng: the base PRNG key data (uint32 array); stored exactly.
      data_state: this process's data-iterator state (JSON-serialisable) or None.
    """
    rng = np.asarray(jax.device_get(rng)).astype(np.uint32)
    meta = {"step": int(step), "rng": rng.tolist()}
    self._manager.save(int(step), force=True, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        OPT_STATE: ocp.args.StandardSave(opt_state),
        TRAIN_META: ocp.args.JsonSave(meta),
        DATA_STATE: ProcessJsonSave(data_state if data_state is not None else {}),
    }))

  def stored_params_metadata(self, step: int) -> Any:
    """The stored params tree of `step` with array metadata (shape, dtype) as leaves."""
    metadata = self._manager.item_metadata(step)
    tree = metadata[PARAMS] if PARAMS in metadata else None
    if tree is None:  # items written by another handler set: read them explicitly.
      tree = ocp.StandardCheckpointHandler().metadata(
          epath.Path(self.directory) / str(step) / PARAMS)
    return getattr(tree, "tree", tree)

  def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> dict:
    """Restores `step` onto the shardings of the abstract trees.

    Args:
      step: a saved step.
      abstract_params, abstract_opt_state: trees of jax.ShapeDtypeStruct (with sharding) that the
        config builds; the stored params must match them exactly.

    Returns:
      dict with `params`, `opt_state`, `step` (int), `rng` (uint32 numpy array), `data_state`.
    """
    where = os.path.join(self.directory, str(step))
    optimizer_state = f"checkpoint {where}: its optimizer state (optim settings changed?)"
    check_tree_fits(abstract_params, self.stored_params_metadata(step), f"checkpoint {where}")
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
          PARAMS: ocp.args.StandardRestore(abstract_params),
          OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
          TRAIN_META: ocp.args.JsonRestore(),
          DATA_STATE: ProcessJsonRestore(),
      }))
    except ValueError as e:
      reason = str(e).splitlines()[0].rstrip(": ")
      if "tree structures do not match" in reason:  # the params were checked above.
        raise errors.InvalidInputError(f"{optimizer_state} does not fit this config: {reason}") from e
      raise errors.InvalidInputError(f"checkpoint {where} cannot be restored: {reason}") from e
    # orbax restores a stored empty entry (the optimizer state of a group that was frozen when
    # the checkpoint was written) as None without complaint; the first step would fail on it.
    check_tree_fits(abstract_opt_state, restored[OPT_STATE], optimizer_state)
    meta = restored[TRAIN_META]
    if int(meta["step"]) != int(step):
      raise ValueError(f"checkpoint {where} says step {meta['step']}")
    return {"params": restored[PARAMS], "opt_state": restored[OPT_STATE], "step": int(step),
            "rng": np.asarray(meta["rng"], np.uint32), "data_state": restored[DATA_STATE]}

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
