"""train.py and eval.py run as a user runs them (subprocesses): user errors (mistyped config
overrides, a checkpoint of another config, missing inputs, a batch the devices cannot split) are
one `error: ...` line with exit status 2; other exceptions keep their traceback; eval.py shows
orbax's INFO logs only with --verbosity."""
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import tiny
from ddetr_jax import convert
from ddetr_jax import trainer
from ddetr_jax.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py") + ":single_scale"
SMALL = ("--config.model.enc_layers=1", "--config.model.dec_layers=1")
_INFO_LINE = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO prefix: I<mmdd> <time> ...


def _run(script, *args, xla_flags=""):
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *([os.path.join(REPO, script)] if script else []),
                         *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _assert_user_error(run, *fragments) -> str:
  """Exit status 2, no traceback, stderr ending in one `error: ` line holding every fragment."""
  assert run.returncode == 2, run.stderr[-3000:]
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), run.stderr[-3000:]
  for fragment in fragments:
    assert fragment in last, (fragment, last)
  return last


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A converted-style checkpoint ({'params': ...}) of TINY + SMALL; zeros (never run)."""
  config = tiny.get_config("single_scale")
  config.model.enc_layers = config.model.dec_layers = 1
  shapes = trainer.abstract_params(build_model(config), config)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  path = str(tmp_path_factory.mktemp("tiny_checkpoint") / "ckpt")
  convert.save_params(params, path)
  return path, params


@pytest.mark.parametrize("script,config_args,override,suggestion", [
    ("train.py", (), "--config.train.num_train_stepz=3", "--config.train.num_train_steps"),
    ("train.py", ("--config", TINY), "--config.trian.num_train_steps=3", "--config.train"),
    ("eval.py", ("--config", TINY), "--config.model.hiden_dim=8", "--config.model.hidden_dim"),
])
def test_mistyped_config_override_is_one_line_with_close_matches(tmp_path, script, config_args,
                                                                 override, suggestion):
  flag = override.split("=")[0]
  extra = ("--checkpoint", str(tmp_path)) if script == "eval.py" else ()
  run = _run(script, *config_args, override, "--workdir", str(tmp_path), *extra)
  _assert_user_error(run, flag + ":", "did you mean", suggestion)
  assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_eval_of_a_checkpoint_of_another_config_names_the_parameters(tiny_checkpoint, tmp_path):
  path, params = tiny_checkpoint
  stored = tuple(params["query_embed"].shape)  # [num_queries, 2 * hidden_dim]
  wanted = (stored[0] - 6,) + stored[1:]
  run = _run("eval.py", "--config", TINY, *SMALL, f"--config.model.num_queries={wanted[0]}",
             "--checkpoint", path, "--workdir", str(tmp_path))
  last = _assert_user_error(run, path, f"query_embed checkpoint {stored} vs model {wanted}")
  assert "ScopeParamShapeError" not in run.stderr
  assert "does not fit" in last and "1 with different shapes" in last


@pytest.mark.parametrize("flags", [("--workdir", "{afile}/eval"), ("--workdir", "{afile}"),
                                   ("--predict_val", "2", "--out", "{afile}/pred")])
def test_eval_output_folder_that_cannot_be_made_is_a_user_error(tiny_checkpoint, tmp_path, flags):
  # Refused before evaluating (it used to fail at the end, after the whole evaluation).
  path, _ = tiny_checkpoint
  afile = tmp_path / "afile"
  afile.write_text("keep me")
  flags = [f.format(afile=afile) for f in flags]
  run = _run("eval.py", "--config", TINY, *SMALL, f"--config.data.cache_dir={tmp_path / 'cache'}",
             "--checkpoint", path, *flags, *(() if "--workdir" in flags else ("--workdir", str(tmp_path))))
  flag = "--out" if "--out" in flags else "--workdir"
  _assert_user_error(run, f"{flag}={flags[flags.index(flag) + 1]!r}")
  assert "evaluated" not in run.stdout and afile.read_text() == "keep me"


def test_eval_shows_orbax_info_logs_only_with_verbosity(tiny_checkpoint, tmp_path):
  path, _ = tiny_checkpoint
  args = ("--config", TINY, *SMALL, f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--checkpoint", path, "--predict", str(tmp_path / "no_images" / "*.jpg"),
          "--workdir", str(tmp_path))
  quiet = _run("eval.py", *args)
  _assert_user_error(quiet, "no image files match", "no_images")
  assert not _INFO_LINE.search(quiet.stderr), quiet.stderr[-3000:]
  verbose = _run("eval.py", *args, "--verbosity=0")
  _assert_user_error(verbose, "no image files match")
  info = [line for line in verbose.stderr.splitlines() if _INFO_LINE.match(line)]
  assert any("checkpoint" in line for line in info), verbose.stderr[-3000:]  # orbax's restore


def test_train_with_a_missing_annotation_file_is_a_user_error(tmp_path):
  missing = str(tmp_path / "missing.json")
  run = _run("train.py", "--config", TINY, "--config.data.source=coco_folder",
             f"--config.data.train_ann_file={missing}", f"--config.data.train_image_dir={tmp_path}",
             f"--config.data.val_ann_file={missing}", f"--config.data.val_image_dir={tmp_path}",
             "--workdir", str(tmp_path / "work"))
  _assert_user_error(run, "annotation file not found", missing)


def test_train_with_a_batch_the_devices_cannot_split_is_a_user_error(tmp_path):
  run = _run("train.py", "--config", TINY, "--config.train.global_batch_size=8",
             "--workdir", str(tmp_path), xla_flags="--xla_force_host_platform_device_count=3")
  _assert_user_error(run, "global_batch_size=8", "number of devices 3")


@pytest.mark.parametrize("config,overrides,fragments", [
    ("configs/missing.py", (), ("--config configs/missing.py: no such config file",)),
    ("configs", (), ("--config configs: 'configs' is a folder; name a config file in it",)),
    ("configs/tiny.py:nope", (), ("--config configs/tiny.py:nope: unknown variant 'nope'",)),
    ("configs/tiny.py:", (), ("--config configs/tiny.py:: unknown variant ''",)),
    (TINY, ("--config.train.num_train_steps.x=1",),
     ("config.train.num_train_steps is a value (int), not a section",)),
    (TINY, ("--config.model.attention_impl=fast",),
     ("config.model.attention_impl) must be one of", "'fast'")),
    (TINY, ("--config.model.backbone_depth=42",), ("backbone_depth must be one of", "got 42")),
    (TINY, ("--config.model.hidden_dim=48",), ("hidden_dim must be a multiple of 32", "48")),
    (TINY, ("--config.data.buckets=abc",), ("data.buckets must be a tuple of image sides",)),
    (TINY, ("--config.data.buckets=(64,0)",), ("data.buckets must be", "(64, 0)")),
    (TINY, ("--config.data.max_boxes=0",), ("data.max_boxes must be an integer >= 1, got 0",)),
])
def test_bad_config_file_variant_or_value_is_a_user_error(tmp_path, config, overrides, fragments):
  workdir = tmp_path / "work"
  run = _run("train.py", "--config", config, *overrides, "--workdir", str(workdir))
  _assert_user_error(run, *fragments)
  if not config.startswith(REPO):  # rejected before anything ran: no workdir left behind.
    assert not workdir.exists()


def test_config_file_refusing_its_variant_is_a_user_error_but_a_bug_in_it_is_not(tmp_path):
  (tmp_path / "by_key.py").write_text(textwrap.dedent("""
      import ml_collections
      SIZES = {"small": 1}
      def get_config(variant="small"):
        return ml_collections.ConfigDict({"size": SIZES[variant]})
  """))
  (tmp_path / "buggy.py").write_text(textwrap.dedent("""
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict({"size": int("12 px")})
  """))
  refused = _run("train.py", "--config", f"{tmp_path / 'by_key.py'}:large",
                 "--workdir", str(tmp_path / "w1"))
  _assert_user_error(refused, "by_key.py:large: get_config('large') raised KeyError 'large'")
  buggy = _run("train.py", "--config", str(tmp_path / "buggy.py"), "--workdir", str(tmp_path / "w2"))
  assert buggy.returncode not in (0, 2), buggy.stderr[-2000:]
  assert "Traceback" in buggy.stderr and "invalid literal for int()" in buggy.stderr


def test_strict_training_on_a_corrupt_image_is_a_user_error_naming_it(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  images.mkdir()
  for i in range(1, 5):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / f"{i}.png")
  with open(images / "3.png", "r+b") as f:
    f.truncate(60)  # PIL opens the header but cannot decode it.
  ann = tmp_path / "ann.json"
  ann.write_text(json.dumps({
      "images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30}
                 for i in range(1, 5)],
      "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 9, 9]}
                      for i in range(1, 5)],
      "categories": [{"id": 1, "name": "thing"}]}))
  run = _run("train.py", "--config", TINY, *SMALL, "--config.data.source=coco_folder",
             f"--config.data.train_ann_file={ann}", f"--config.data.train_image_dir={images}",
             f"--config.data.val_ann_file={ann}", f"--config.data.val_image_dir={images}",
             "--config.data.strict=True", "--config.train.global_batch_size=4",
             "--config.train.num_train_steps=2", "--workdir", str(tmp_path / "work"))
  _assert_user_error(run, "cannot decode image", "3.png")


@pytest.mark.parametrize("script,args,fragment", [
    ("train.py", ("--coordinator_address=localhost:12355",),
     "needs --num_processes and --process_id too"),
    ("train.py", ("--num_processes=2",), "--num_processes need --coordinator_address"),
    ("eval.py", ("--coordinator_address=nohostport", "--num_processes=1", "--process_id=0"),
     "'nohostport': expected HOST:PORT"),
    ("train.py", ("--coordinator_address=localhost:1", "--num_processes=2", "--process_id=5"),
     "--process_id=5 must be in [0, --num_processes=2)"),
    ("eval.py", ("--predict_val=-1",), "--predict_val=-1: give a number"),
])
def test_multihost_flag_mistakes_are_user_errors(tmp_path, script, args, fragment):
  extra = ("--checkpoint", str(tmp_path)) if script == "eval.py" else ()
  run = _run(script, "--config", TINY, *args, *extra, "--workdir", str(tmp_path / "w"))
  _assert_user_error(run, fragment)


def test_workdir_with_a_tilde_is_in_the_home_folder(tmp_path):
  env_home = tmp_path / "home"
  env_home.mkdir()
  env = dict(os.environ, HOME=str(env_home), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=3")
  run = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config", TINY,
                        "--config.train.global_batch_size=8", "--workdir=~/tilde_run"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  _assert_user_error(run, "global_batch_size=8")  # stops early, after making the workdir.
  assert (env_home / "tilde_run").is_dir() and not (tmp_path / "~").exists()


def test_only_user_errors_lose_their_traceback(tmp_path):
  program = textwrap.dedent("""
      from ddetr_jax import cli, errors

      def main(argv):
        if argv[1] == "user":
          raise errors.MissingInputError("no dataset in /data/tfds")
        raise KeyError("a bug")

      cli.run(main)
  """)
  user = _run(None, "-c", program, "user")
  assert user.returncode == 2 and user.stderr == "error: no dataset in /data/tfds\n", user.stderr
  bug = _run(None, "-c", program, "bug")
  assert bug.returncode == 1, bug.stderr
  assert "Traceback" in bug.stderr and "KeyError: 'a bug'" in bug.stderr


@pytest.mark.parametrize("args,fragment", [
    ((), "not neither"),
    (("--checkpoint=a", "--torch_checkpoint=b"), "not both"),
])
def test_eval_needs_exactly_one_checkpoint_flag(args, fragment):
  run = _run("eval.py", "--config", TINY, *args)
  _assert_user_error(run, "--checkpoint=DIR", "--torch_checkpoint=FILE", fragment)


@pytest.mark.parametrize("script,args,fragment", [
    ("train.py", ("--workdri=x",), "Unknown command line flag 'workdri'"),
    ("eval.py", ("--checkpoint=a", "--num_attention=two"), "'two'"),
])
def test_flags_absl_cannot_parse_are_user_errors(script, args, fragment):
  run = _run(script, "--config", TINY, *args)
  last = _assert_user_error(run, fragment)
  assert "--helpfull" in last and "FATAL" not in run.stderr, run.stderr
