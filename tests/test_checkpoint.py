"""checkpoint.py with a toy training state: exact round trip, keep-K, a SIGKILL in the middle of a
save, and mismatch errors naming the parameters."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddetr_jax import checkpoint
from ddetr_jax import evaluator
from ddetr_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy_state(seed: float):
  params = {"backbone": {"layer2_0": {"conv1": {"kernel": jnp.full((3, 3, 2, 4), seed)}}},
            "class_embed": {"kernel": jnp.arange(12.0).reshape(3, 4) * seed,
                            "bias": jnp.full((4,), -seed)}}
  tx = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(1e-3))
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda x: x * 0.5 + 1.0, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count.
  return params, opt_state


def _abstract(tree, mesh):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding.replicated(mesh)), tree)


def test_round_trip_is_exact_and_keeps_the_last_k(tmp_path):
  mesh = sharding.make_mesh()
  manager = checkpoint.CheckpointManager(str(tmp_path), keep=2)
  for step in (10, 20, 30):
    params, opt_state = _toy_state(step)
    manager.save(step, params, opt_state, jax.random.PRNGKey(step), {"next_index": step * 8})
  manager.wait()
  assert manager.all_steps() == [20, 30] and manager.latest_step() == 30
  params, opt_state = _toy_state(30)
  restored = manager.restore(30, _abstract(params, mesh), _abstract(opt_state, mesh))
  assert restored["step"] == 30
  assert restored["data_state"] == {"next_index": 240}
  np.testing.assert_array_equal(restored["rng"], np.asarray(jax.random.PRNGKey(30)))
  assert restored["rng"].dtype == np.uint32
  for got, want in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.is_equivalent_to(sharding.replicated(mesh), got.ndim)
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(opt_state)
  for got, want in zip(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(opt_state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The evaluator reads the params item of the latest step.
  loaded = evaluator.load_params(str(tmp_path))
  np.testing.assert_array_equal(loaded["class_embed"]["kernel"], np.asarray(params["class_embed"]["kernel"]))
  manager.close()


def test_restore_into_a_tree_it_does_not_fit_names_the_parameters(tmp_path):
  manager = checkpoint.CheckpointManager(str(tmp_path), keep=1)
  params, opt_state = _toy_state(1.0)
  manager.save(5, params, opt_state, jax.random.PRNGKey(0), None)
  manager.wait()
  other = {"backbone": params["backbone"],
           "class_embed": {"kernel": jnp.zeros((3, 7)), "bias": jnp.zeros((7,))},
           "bbox_embed": {"kernel": jnp.zeros((3, 4))}}
  with pytest.raises(ValueError) as error:
    manager.restore(5, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other),
                    jax.eval_shape(lambda: opt_state))
  message = str(error.value)
  assert "bbox_embed/kernel" in message  # missing from the checkpoint
  assert "class_embed/kernel checkpoint (3, 4) vs model (3, 7)" in message
  assert "class_embed/bias checkpoint (4,) vs model (7,)" in message
  assert "backbone" not in message
  manager.close()


def test_check_tree_fits_partial_checkpoint():
  model = {"backbone": {"conv1": {"kernel": np.zeros((2, 2))}}, "head": {"bias": np.zeros(3)}}
  checkpoint.check_tree_fits(model, {"backbone": model["backbone"]}, "x", allow_missing=True)
  with pytest.raises(ValueError, match=r"1 missing from the checkpoint: \['head/bias'\]"):
    checkpoint.check_tree_fits(model, {"backbone": model["backbone"]}, "x")
  with pytest.raises(ValueError, match=r"1 not in the model: \['neck/w'\]"):
    checkpoint.check_tree_fits(model, dict(model, neck={"w": np.zeros(1)}), "x",
                               allow_missing=True)


_KILLED_SAVER = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from ddetr_jax import checkpoint
    from tests.test_checkpoint import _toy_state
    manager = checkpoint.CheckpointManager(sys.argv[1], keep=3)
    params, opt_state = _toy_state(1.0)
    manager.save(1, params, opt_state, jax.random.PRNGKey(1), {"next_index": 8})
    manager.wait()

    def stuck_save(self, directory, args):  # part of step 2 is written, then the process hangs.
      (directory / "partial.json").write_text('{"next_')
      print("IN_SAVE", flush=True)
      time.sleep(600)

    checkpoint.ProcessJsonHandler.save = stuck_save
    params, opt_state = _toy_state(2.0)
    manager.save(2, params, opt_state, jax.random.PRNGKey(2), {"next_index": 16})
    manager.wait()
    print("FINISHED", flush=True)
""")


def test_sigkill_during_save_leaves_the_previous_checkpoint_usable(tmp_path):
  directory = str(tmp_path / "checkpoints")
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, directory], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("IN_SAVE"):
      break
  else:
    raise AssertionError("saver ended early:\n" + "".join(lines[-30:]))
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  leftovers = [n for n in os.listdir(directory) if n != "1"]
  assert leftovers and all("tmp" in n for n in leftovers), os.listdir(directory)

  manager = checkpoint.CheckpointManager(directory, keep=3)
  assert manager.latest_step() == 1 and manager.all_steps() == [1]
  params, opt_state = _toy_state(1.0)
  restored = manager.restore(1, jax.eval_shape(lambda: params), jax.eval_shape(lambda: opt_state))
  assert restored["data_state"] == {"next_index": 8}
  for got, want in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The interrupted step can be saved again.
  params2, opt_state2 = _toy_state(2.0)
  manager.save(2, params2, opt_state2, jax.random.PRNGKey(2), {"next_index": 16})
  manager.wait()
  assert manager.all_steps() == [1, 2]
  assert sorted(os.listdir(directory)) == ["1", "2"]
  manager.close()
