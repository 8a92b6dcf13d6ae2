"""Checkpoint conversion: official / HF hub / torchvision layouts, strictness and safety."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from configs import tiny
from ddetr_jax import convert
from ddetr_jax import errors
from tests.test_model_hf_reference import build_hf_model


@pytest.fixture(scope="module")
def hf_models():
  return {v: build_hf_model(tiny.get_config(v).model, seed=4) for v in ("default", "box_refine")}


def _flat(params) -> dict:
  return {"/".join(str(k.key) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# Official key names written from the official checkpoints' layout (independent of convert.py).
def _hf_to_official_for_test(sd: dict, dec_layers: int) -> dict:
  out = {}
  layer_roles = {
      "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "mlp.fc1": "linear1",
                  "mlp.fc2": "linear2", "self_attn": "self_attn"},
      "decoder": {"self_attn_layer_norm": "norm2", "encoder_attn_layer_norm": "norm1",
                  "final_layer_norm": "norm3", "mlp.fc1": "linear1", "mlp.fc2": "linear2",
                  "encoder_attn": "cross_attn", "self_attn.o_proj": "self_attn.out_proj"},
  }
  for k, v in sd.items():
    v = v.clone()
    if k.startswith("model.backbone.model."):
      rest = k[len("model.backbone.model."):]
      rest = rest.replace("embedder.embedder.convolution", "conv1").replace(
          "embedder.embedder.normalization", "bn1")
      m = re.match(r"encoder\.stages\.(\d)\.layers\.(\d+)\.(.*)", rest)
      if m:
        s, b, tail = m.groups()
        tail = re.sub(r"^layer\.(\d)\.convolution", lambda g: f"conv{int(g.group(1)) + 1}", tail)
        tail = re.sub(r"^layer\.(\d)\.normalization", lambda g: f"bn{int(g.group(1)) + 1}", tail)
        tail = tail.replace("shortcut.convolution", "downsample.0").replace("shortcut.normalization",
                                                                          "downsample.1")
        rest = f"layer{int(s) + 1}.{b}.{tail}"
      out["backbone.0.body." + rest] = v
      continue
    m = re.match(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.*)", k)
    if m:
      part, i, rest = m.groups()
      if re.match(r"self_attn\.[qkv]_proj", rest) and part == "decoder":
        continue  # packed below
      for hf_name, off in layer_roles[part].items():
        if rest.startswith(hf_name + "."):
          rest = off + rest[len(hf_name):]
          break
      out[f"transformer.{part}.layers.{i}.{rest}"] = v
      continue
    k2 = {"model.level_embed": "transformer.level_embed",
          "model.query_position_embeddings.weight": "query_embed.weight"}.get(k, k)
    k2 = re.sub(r"^model\.reference_points", "transformer.reference_points", k2)
    k2 = re.sub(r"^model\.decoder\.", "transformer.decoder.", k2)
    k2 = re.sub(r"^model\.input_proj", "input_proj", k2)
    out[k2] = v
  for i in range(dec_layers):
    p = f"model.decoder.layers.{i}.self_attn."
    for kind in ("weight", "bias"):
      out[f"transformer.decoder.layers.{i}.self_attn.in_proj_{kind}"] = torch.cat(
          [sd[p + f"{c}_proj.{kind}"] for c in "qkv"])
  return out


def test_official_pth_layout(hf_models, tmp_path):
  config = tiny.get_config("default")
  sd = hf_models["default"].state_dict()
  official = _hf_to_official_for_test(sd, config.model.dec_layers)
  assert "class_embed.1.weight" in official  # shared heads saved per layer
  official["backbone.0.body.layer1.0.conv1.total_ops"] = torch.zeros(1, dtype=torch.float64)
  official["total_params"] = torch.zeros(1)
  official["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
  path = tmp_path / "checkpoint.pth"
  torch.save({"model": official, "epoch": 49, "args": {"lr": 2e-4}}, path)
  _assert_same_params(convert.load_torch_params(str(path), config),
                      convert.params_from_hf_state_dict(sd, config))


def test_full_size_two_stage_converts_to_the_trainers_params(tmp_path):
  # The conversion traced the model on 64 px images: 85 encoder positions, fewer than the 300
  # queries two-stage picks among them, so every full-size two-stage checkpoint failed.
  from configs import deformable_detr  # pylint: disable=g-import-not-at-top
  from ddetr_jax import trainer  # pylint: disable=g-import-not-at-top
  from ddetr_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = deformable_detr.get_config("two_stage")
  hf = build_hf_model(config.model, seed=1)
  params = convert.params_from_hf_state_dict(hf.state_dict(), config)
  wanted = trainer.abstract_params(build_model(config), config)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(wanted)
  for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(wanted)):
    assert got.shape == want.shape
  kernel = [v for k, v in _flat(params).items() if k.endswith("enc_output/kernel")]
  assert len(kernel) == 1  # the two-stage proposal head, with HF's weights
  np.testing.assert_array_equal(kernel[0], hf.state_dict()["model.enc_output.weight"].numpy().T)


def test_hub_names_timm_backbone_and_safetensors(hf_models, tmp_path):
  """SenseTime hub naming: conv_encoder + timm (torchvision) ResNet names, fc1/out_proj, and tied
  duplicates dropped as save_pretrained does."""
  from safetensors.torch import save_file
  config = tiny.get_config("box_refine")
  sd = hf_models["box_refine"].state_dict()
  official = _hf_to_official_for_test(sd, config.model.dec_layers)
  hub = {}
  for k, v in sd.items():
    if k.startswith("model.backbone.model."):
      continue
    k = k.replace("self_attn.o_proj", "self_attn.out_proj").replace("mlp.fc", "fc")
    if k.startswith("model.decoder.bbox_embed."):
      continue  # tied to bbox_embed.*: not in the hub file
    hub[k] = v.clone().contiguous()
  for k, v in official.items():
    if k.startswith("backbone.0.body."):
      hub["model.backbone.conv_encoder.model." + k[len("backbone.0.body."):]] = v.contiguous()
  path = tmp_path / "model.safetensors"
  save_file(hub, str(path))
  _assert_same_params(convert.load_torch_params(str(path), config),
                      convert.params_from_hf_state_dict(sd, config))


def test_torchvision_resnet_backbone_only(hf_models, tmp_path):
  config = tiny.get_config("default")
  official = _hf_to_official_for_test(hf_models["default"].state_dict(), config.model.dec_layers)
  resnet = {k[len("backbone.0.body."):]: v for k, v in official.items() if k.startswith("backbone.0.body.")}
  resnet["fc.weight"], resnet["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
  path = tmp_path / "resnet18.pth"
  torch.save(resnet, path)
  init = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7.0, np.float32),
                                convert.expected_param_shapes(config))
  params = convert.load_torch_params(str(path), config, init_params=init)
  reference = convert.params_from_hf_state_dict(hf_models["default"].state_dict(), config)
  _assert_same_params(params["backbone"], reference["backbone"])
  assert np.all(params["transformer"]["level_embed"] == 7.0)
  np.testing.assert_array_equal(params["backbone"]["layer2_0"]["conv1"]["kernel"],
                                resnet["layer2.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))


def _error(state_dict, config) -> str:
  with pytest.raises(convert.CheckpointError) as e:
    convert.params_from_state_dict(state_dict, config)
  return str(e.value)


def test_wrong_variant_is_named(hf_models):
  msg = _error(hf_models["box_refine"].state_dict(), tiny.get_config("default"))
  assert "fits variant 'box_refine'" in msg
  assert "\n" not in msg and "not config variant 'default'" in msg  # one line, no key lists.
  msg = _error(hf_models["default"].state_dict(), tiny.get_config("box_refine"))
  assert "fits variant 'default'" in msg
  two_stage = build_hf_model(tiny.get_config("two_stage").model).state_dict()
  assert "fits variant 'two_stage'" in _error(two_stage, tiny.get_config("box_refine"))
  assert "fits variant 'single_scale" in _error(
      build_hf_model(tiny.get_config("single_scale").model).state_dict(), tiny.get_config("default"))


def test_missing_unused_and_bad_shape_reported_together(hf_models):
  sd = dict(hf_models["default"].state_dict())
  del sd["model.encoder.layers.1.self_attn.value_proj.weight"]
  sd["model.extra.weight"] = torch.zeros(3, 4)
  sd["model.level_embed"] = torch.zeros(4, 31)
  msg = _error(sd, tiny.get_config("default"))
  assert "missing (1)" in msg and "transformer.encoder.layers.1.self_attn.value_proj.weight" in msg
  assert "encoder/layers_1/self_attn/value_proj/kernel, shape (32, 32)" in msg
  assert "unused (1)" in msg and "model.extra.weight (3, 4)" in msg
  assert "shape mismatch (1)" in msg and "transformer.level_embed: checkpoint (4, 31)" in msg
  assert "expects (4, 32)" in msg


def test_truncated_file(hf_models, tmp_path):
  path = tmp_path / "truncated.pth"
  torch.save(hf_models["default"].state_dict(), path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.CheckpointError, match=re.escape(str(path)) + ".*truncated or corrupt"):
    convert.load_torch_params(str(path), tiny.get_config("default"))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(convert.CheckpointError, match="not a readable safetensors"):
    convert.load_torch_params(str(bad), tiny.get_config("default"))


@pytest.mark.parametrize("name,content,why", [
    ("garbage.pth", b"garbage", "not a pickle; it starts with b'garbage'"),
    ("random.bin", np.random.default_rng(0).bytes(4096), "neither a zip archive nor a legacy"),
    ("empty.pth", b"", "the file is empty"),
    ("model.bin", b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a": 1}', "looks like a safetensors"),
])
def test_file_that_is_not_a_torch_checkpoint_says_so(tmp_path, name, content, why):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(convert.CheckpointError) as e:
    convert.read_state_dict(str(path))
  msg = str(e.value)
  assert msg.startswith(f"{path}: not a PyTorch checkpoint: ") and why in msg, msg
  assert "refusing" not in msg and "\n" not in msg


def test_zip_without_torch_data_says_so(tmp_path):
  import zipfile
  path = tmp_path / "archive.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("notes.txt", "hello")
  with pytest.raises(convert.CheckpointError, match=re.escape(f"{path}: not a PyTorch checkpoint: it "
                                                              "is a zip archive without the data.pkl")):
    convert.read_state_dict(str(path))


class _NotATensor:
  def __init__(self):
    self.lr = 0.1


@pytest.mark.parametrize("zip_format", [True, False])
def test_checkpoint_holding_an_object_is_refused_with_its_class(tmp_path, zip_format):
  path = tmp_path / "with_object.pth"
  torch.save({"model": {"x": torch.zeros(1)}, "scheduler": _NotATensor()}, path,
             _use_new_zipfile_serialization=zip_format)
  with pytest.raises(convert.CheckpointError) as e:
    convert.read_state_dict(str(path))
  msg = str(e.value)
  assert msg.startswith(f"{path}: refusing to load: the file holds objects other than tensors"), msg
  assert "GLOBAL tests.test_convert._NotATensor was not an allowed global" in msg and "\n" not in msg


def test_legacy_format_truncated_is_corrupt_not_foreign(tmp_path):
  path = tmp_path / "legacy.pth"
  torch.save({"x": torch.zeros(100)}, path, _use_new_zipfile_serialization=False)
  np.testing.assert_array_equal(convert.read_state_dict(str(path))["x"], np.zeros(100))
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(convert.CheckpointError, match=re.escape(str(path)) + ": not a readable PyTorch "
                     r"checkpoint \(truncated or corrupt\?\)"):
    convert.read_state_dict(str(path))


def test_missing_checkpoint_and_folder(tmp_path):
  with pytest.raises(convert.MissingCheckpointError, match="no such checkpoint file") as e:
    convert.load_torch_params(str(tmp_path / "nope.pth"), tiny.get_config("default"))
  assert isinstance(e.value, errors.MissingInputError) and isinstance(e.value, FileNotFoundError)
  with pytest.raises(convert.CheckpointError, match=re.escape(f"{tmp_path}: is a folder")):
    convert.read_state_dict(str(tmp_path))


class _Malicious:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  torch.save({"model": {"x": torch.zeros(1)}, "payload": _Malicious(str(marker))}, path)
  with pytest.raises(convert.CheckpointError, match="refusing to load"):
    convert.load_torch_params(str(path), tiny.get_config("default"))
  assert not marker.exists()


def test_cli_writes_orbax_checkpoint(hf_models, tmp_path):
  config = tiny.get_config("default")
  sd = hf_models["default"].state_dict()
  path = tmp_path / "hf.bin"
  torch.save(sd, path)
  out = tmp_path / "converted"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "ddetr_jax.convert", f"--torch_checkpoint={path}",
       f"--config={root}/configs/tiny.py:default", f"--out={out}"],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(str(out))
  _assert_same_params(restored["params"], convert.params_from_hf_state_dict(sd, config))


# ----------------------------------------------------------------------------- --out, --overwrite

def _small_params(value: float) -> dict:
  return {"backbone": {"conv1": {"kernel": np.full((3, 2), value, np.float32)}}}


def _restored(path) -> dict:
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(str(path))["params"]


def test_save_params_into_new_or_empty_folder(tmp_path):
  convert.save_params(_small_params(1.0), str(tmp_path / "a" / "new"))
  _assert_same_params(_restored(tmp_path / "a" / "new"), _small_params(1.0))
  (tmp_path / "empty").mkdir()
  convert.save_params(_small_params(2.0), str(tmp_path / "empty"))
  _assert_same_params(_restored(tmp_path / "empty"), _small_params(2.0))


def test_overwrite_replaces_only_a_converted_checkpoint(tmp_path):
  out = tmp_path / "converted"
  convert.save_params(_small_params(1.0), str(out))
  with pytest.raises(errors.InvalidInputError, match=re.escape(f"{out}: the folder exists and is not "
                                                               "empty") + ".*--overwrite"):
    convert.save_params(_small_params(2.0), str(out))
  _assert_same_params(_restored(out), _small_params(1.0))
  convert.save_params(_small_params(2.0), str(out), overwrite=True)
  _assert_same_params(_restored(out), _small_params(2.0))
  link = tmp_path / "link"
  link.symlink_to(out)  # through a symbolic link: the folder it points to is replaced.
  convert.save_params(_small_params(3.0), str(link), overwrite=True)
  assert link.is_symlink()
  _assert_same_params(_restored(out), _small_params(3.0))


def _files(folder) -> dict:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _orbax_checkpoint(path, tree):
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(path), tree)
  checkpointer.wait_until_finished()


@pytest.mark.parametrize("kind,why", [
    ("workdir", "it holds checkpoints/, notes.txt"),
    ("checkpoint_and_notes", "it holds notes.txt"),
    ("params_not_under_params", "its tree is ['backbone']"),
    ("no_checkpoint_metadata", "it has no orbax _CHECKPOINT_METADATA file"),
])
def test_folder_with_other_content_is_never_deleted(tmp_path, kind, why):
  out = tmp_path / "out"
  if kind == "workdir":
    (out / "checkpoints" / "100").mkdir(parents=True)
    (out / "checkpoints" / "100" / "_CHECKPOINT_METADATA").write_text("{}")
    (out / "notes.txt").write_text("my training run")
  elif kind == "checkpoint_and_notes":
    convert.save_params(_small_params(1.0), str(out))
    (out / "notes.txt").write_text("keep me")
  elif kind == "params_not_under_params":  # e.g. the params item of a training step.
    _orbax_checkpoint(out, _small_params(1.0))
  else:
    convert.save_params(_small_params(1.0), str(out))
    (out / "_CHECKPOINT_METADATA").unlink()
  before = _files(out)
  for overwrite in (False, True):
    with pytest.raises(errors.InvalidInputError) as e:
      convert.save_params(_small_params(2.0), str(out), overwrite=overwrite)
    assert str(e.value).startswith(f"{out}: ") and "\n" not in str(e.value)
  assert "not replaced, even with --overwrite" in str(e.value) and why in str(e.value), str(e.value)
  assert _files(out) == before


def test_out_naming_a_file_is_refused(tmp_path):
  out = tmp_path / "params.msgpack"
  out.write_bytes(b"data")
  for overwrite in (False, True):
    with pytest.raises(errors.InvalidInputError, match=re.escape(f"{out}: is a file, not a folder")):
      convert.check_out_dir(str(out), overwrite)
  assert out.read_bytes() == b"data"


def test_out_that_cannot_be_created_is_refused_before_converting(tmp_path, monkeypatch):
  # orbax, asked to save there, raised from its background threads and the process never exited.
  afile = tmp_path / "afile"
  afile.write_bytes(b"data")
  with pytest.raises(errors.InvalidInputError,
                     match=re.escape(f"{afile}/a/b: cannot be created: {str(afile)!r} is a file")):
    convert.check_out_dir(str(afile / "a" / "b"))
  assert afile.read_bytes() == b"data"
  convert.check_out_dir(str(tmp_path / "new" / "deeper"))  # a writable ancestor: allowed.
  # No write permission in the nearest existing folder (tests may run as root, who has it).
  monkeypatch.setattr(convert.os, "access", lambda path, mode: path != str(tmp_path))
  with pytest.raises(errors.InvalidInputError, match="no permission to write in"):
    convert.check_out_dir(str(tmp_path / "new" / "deeper"))
  assert not (tmp_path / "new").exists()


def test_out_that_resolves_to_an_existing_folder_is_judged_by_it(tmp_path, monkeypatch):
  """'' and 'missing/..' name the current folder once resolved: it is refused, not emptied."""
  (tmp_path / "mine.txt").write_text("keep me")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(errors.InvalidInputError, match=r"--out is empty"):
    convert.save_params(_small_params(2.0), "", overwrite=True)
  for overwrite in (False, True):
    with pytest.raises(errors.InvalidInputError,
                       match=re.escape(f"missing/.. (= {tmp_path})") + r": (the folder exists|not "
                             r"replaced)"):
      convert.save_params(_small_params(2.0), "missing/..", overwrite=overwrite)
  assert sorted(os.listdir(tmp_path)) == ["mine.txt"]
  assert (tmp_path / "mine.txt").read_text() == "keep me"


def _run_cli(*args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ddetr_jax.convert", *map(str, args)],
                        cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_cli_out_and_overwrite(hf_models, tmp_path):
  config_arg = "--config=configs/tiny.py:default"
  sd = hf_models["default"].state_dict()
  path = tmp_path / "hf.bin"
  torch.save(sd, path)
  out = tmp_path / "converted"
  ok = _run_cli(f"--torch_checkpoint={path}", config_arg, f"--out={out}")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert ok.stdout.startswith(f"converted {path} (huggingface, ")
  assert not re.search(r"^I\d{4} ", ok.stderr, re.M), ok.stderr[:3000]  # orbax's INFO logs quiet.

  doubled = tmp_path / "doubled.bin"
  torch.save({k: v * 2 for k, v in sd.items()}, doubled)
  refused = _run_cli(f"--torch_checkpoint={doubled}", config_arg, f"--out={out}")
  assert refused.returncode == 2
  assert refused.stderr.startswith(f"error: {out}: the folder exists and is not empty")
  assert refused.stderr.count("\n") == 1 and "--overwrite" in refused.stderr
  _assert_same_params(_restored(out), convert.params_from_hf_state_dict(sd, tiny.get_config("default")))
  replaced = _run_cli(f"--torch_checkpoint={doubled}", config_arg, f"--out={out}", "--overwrite")
  assert replaced.returncode == 0, replaced.stderr[-3000:]
  _assert_same_params(_restored(out), convert.params_from_hf_state_dict(
      {k: v * 2 for k, v in sd.items()}, tiny.get_config("default")))

  workdir = tmp_path / "workdir"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "checkpoints" / "metrics.jsonl").write_text("{}\n")
  kept = _run_cli(f"--torch_checkpoint={path}", config_arg, f"--out={workdir}", "--overwrite")
  assert kept.returncode == 2
  assert kept.stderr == (f"error: {workdir}: not replaced, even with --overwrite: it is not a "
                         "checkpoint written by ddetr_jax.convert (it holds checkpoints/); name a "
                         "new folder\n"), kept.stderr
  assert (workdir / "checkpoints" / "metrics.jsonl").read_text() == "{}\n"


def test_cli_user_errors_are_one_line(hf_models, tmp_path):
  box_refine = tmp_path / "box_refine.bin"
  torch.save(hf_models["box_refine"].state_dict(), box_refine)
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_text("garbage")
  out = tmp_path / "out"
  for checkpoint, message in [
      (tmp_path / "nope.pth", "no such checkpoint file"),
      (garbage, "not a readable safetensors file"),
      (box_refine, "the checkpoint fits variant 'box_refine'"),
  ]:
    run = _run_cli(f"--torch_checkpoint={checkpoint}", "--config=configs/tiny.py:default", f"--out={out}")
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.startswith(f"error: {checkpoint}: ") and message in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
  assert not out.exists()
  no_config = _run_cli(f"--torch_checkpoint={box_refine}", f"--out={out}")
  assert no_config.returncode != 0 and "Traceback" not in no_config.stderr
  assert "Flag --config must have a value other than None" in no_config.stderr, no_config.stderr
