"""PyTorch -> Flax weight conversion for Deformable DETR (strict, no pickled code).

Accepted checkpoints (auto-detected):
  * official `.pth` (fundamentalvision/Deformable-DETR): a dict whose `model` entry is the state_dict;
    shared heads saved once per decoder layer; stray `total_params`/`total_ops` entries ignored.
  * HuggingFace (`SenseTime/deformable-detr*` hub files, `.safetensors` or `.bin`, or the state_dict
    of a `transformers` DeformableDetrForObjectDetection), with timm/torchvision or HF ResNet names.
  * a plain torchvision ResNet state_dict (depth 18/34/50/101): fills the backbone only.

Every layout is first renamed to the official names, then mapped to the Flax tree of
`ddetr_jax.models.DeformableDETR`. Loading never unpickles code (`torch.load(weights_only=True)` or
safetensors). Conversion is strict: all missing keys, unused keys and shape mismatches are
reported together (`CheckpointError`), and a checkpoint of another variant is named.

CLI: python -m ddetr_jax.convert --torch_checkpoint PATH --config configs/deformable_detr.py:VARIANT --out DIR
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddetr_jax import errors

# Per-module entries that are not parameters: BatchNorm counters, thop profiling counters.
_IGNORED_SUFFIXES = ("num_batches_tracked", "total_params", "total_ops")
_HEAD_RE = re.compile(r"^(transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.*)$")


class CheckpointError(errors.InvalidInputError):
  """A checkpoint that cannot be loaded into the configured model; the message says why."""


# ----------------------------------------------------------------------------- reading files

def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into {name: float32/int numpy array} without running pickled code.

  `.safetensors` is read with safetensors; anything else with `torch.load(weights_only=True)`.
  A dict with a `model` (official) or `state_dict` entry is unwrapped. Non-tensor entries (epoch,
  args, optimizer state, ...) outside the state_dict are dropped.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such checkpoint file")
  if path.endswith(".safetensors"):
    try:
      from safetensors.torch import load_file
      tensors = load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - any failure is reported with the file name.
      raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
  else:
    import torch
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise CheckpointError(
          f"{path}: refusing to load: the file needs arbitrary unpickling (it holds objects other "
          f"than tensors and plain containers, possibly code). Re-save its state_dict with "
          f"torch.save(state_dict) or convert it to safetensors. Details: {str(e).splitlines()[0]}") from e
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise various errors.
      raise CheckpointError(
          f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
      obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
      raise CheckpointError(f"{path}: the checkpoint holds no tensors (keys: {sorted(obj)[:10]})")
  return to_numpy_state_dict(tensors)


def to_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """torch tensors / arrays -> numpy; floating tensors become float32."""
  out = {}
  for k, v in state_dict.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu()
      v = v.float().numpy() if v.is_floating_point() else v.numpy()
    out[k] = np.asarray(v)
  return out


# ----------------------------------------------------------------------------- renaming to official

_RESNET_TORCHVISION_RE = re.compile(r"^(conv1|bn1|layer[1-4]\.\d+\.)")


def _hf_resnet_to_torchvision(name: str) -> str:
  """HF `ResNetBackbone` names -> torchvision names (timm names already are torchvision's)."""
  m = re.match(r"^embedder\.embedder\.(convolution|normalization)\.(.*)$", name)
  if m:
    return ("conv1." if m.group(1) == "convolution" else "bn1.") + m.group(2)
  m = re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$", name)
  if not m:
    return name
  stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
  prefix = f"layer{stage + 1}.{block}."
  m2 = re.match(r"^shortcut\.(convolution|normalization)\.(.*)$", rest)
  if m2:
    return prefix + ("downsample.0." if m2.group(1) == "convolution" else "downsample.1.") + m2.group(2)
  m2 = re.match(r"^layer\.(\d+)\.(convolution|normalization)\.(.*)$", rest)
  if m2:
    j = int(m2.group(1)) + 1
    return prefix + (f"conv{j}." if m2.group(2) == "convolution" else f"bn{j}.") + m2.group(3)
  return name


_HF_LAYER_RENAMES = {
    "encoder": [(r"self_attn_layer_norm\.", "norm1."), (r"final_layer_norm\.", "norm2."),
                (r"(mlp\.)?fc1\.", "linear1."), (r"(mlp\.)?fc2\.", "linear2.")],
    "decoder": [(r"self_attn_layer_norm\.", "norm2."), (r"encoder_attn_layer_norm\.", "norm1."),
                (r"final_layer_norm\.", "norm3."), (r"encoder_attn\.", "cross_attn."),
                (r"self_attn\.o_proj\.", "self_attn.out_proj."),
                (r"(mlp\.)?fc1\.", "linear1."), (r"(mlp\.)?fc2\.", "linear2.")],
}


def _hf_to_official(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames HF (hub or in-memory) keys to the official ones; packs q/k/v into in_proj."""
  out, qkv = {}, {}
  for key, value in state_dict.items():
    name = key
    m = re.match(r"^model\.backbone\.(conv_encoder\.)?model\.(.*)$", name)
    if m:
      out["backbone.0.body." + _hf_resnet_to_torchvision(m.group(2))] = value
      continue
    m = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.*)$", name)
    if m:
      part, idx, rest = m.groups()
      for pattern, repl in _HF_LAYER_RENAMES[part]:
        rest = re.sub("^" + pattern, repl, rest)
      m2 = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest) if part == "decoder" else None
      if m2:
        qkv.setdefault((idx, m2.group(2)), {})[m2.group(1)] = (key, value)
        continue
      out[f"transformer.{part}.layers.{idx}.{rest}"] = value
      continue
    name = re.sub(r"^model\.input_proj\.", "input_proj.", name)
    name = re.sub(r"^model\.level_embed$", "transformer.level_embed", name)
    name = re.sub(r"^model\.query_position_embeddings\.weight$", "query_embed.weight", name)
    name = re.sub(r"^model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.",
                  r"transformer.\1.", name)
    name = re.sub(r"^model\.decoder\.(bbox_embed|class_embed)\.", r"transformer.decoder.\1.", name)
    out[name] = value
  for (idx, kind), parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      for key, value in parts.values():  # incomplete triple: keep as-is so it is reported.
        out[key] = value
      continue
    out[f"transformer.decoder.layers.{idx}.self_attn.in_proj_{kind}"] = np.concatenate(
        [parts[c][1] for c in "qkv"], axis=0)
  return out


def to_official_names(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """Detects the layout and renames to the official keys. Returns (state_dict, layout) with
  layout one of 'official', 'huggingface', 'torchvision_resnet'."""
  keys = list(state_dict)
  if any(k.startswith("model.") for k in keys):
    return _hf_to_official(state_dict), "huggingface"
  if any(k.startswith(("backbone.0.body.", "transformer.")) for k in keys):
    return dict(state_dict), "official"
  if any(_RESNET_TORCHVISION_RE.match(k) for k in keys) or any(k.startswith("embedder.") for k in keys):
    return {"backbone.0.body." + _hf_resnet_to_torchvision(k): v for k, v in state_dict.items()}, \
        "torchvision_resnet"
  raise CheckpointError(
      "unrecognised checkpoint layout: expected official Deformable DETR keys (backbone.0.body.*, "
      f"transformer.*), HuggingFace keys (model.*) or torchvision ResNet keys; first keys: {keys[:5]}")


# ----------------------------------------------------------------------------- Flax <-> official

def _official_name(path: tuple[str, ...]) -> tuple[str, str, Optional[int]]:
  """Flax param path -> (official key, transform, slice index). transform in
  {'dense', 'conv', 'copy'}; slice index picks q/k/v of a packed in_proj."""
  leaf = path[-1]
  torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}.get(leaf, leaf)
  transform = "dense" if leaf == "kernel" else "copy"
  head = path[0]
  if head == "backbone":
    parts = []
    for p in path[1:-1]:
      m = re.match(r"^layer(\d)_(\d+)$", p)
      if m:
        parts.append(f"layer{m.group(1)}.{m.group(2)}")
      else:
        parts.append({"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(p, p))
    return "backbone.0.body." + ".".join(parts + [torch_leaf]), ("conv" if leaf == "kernel" else "copy"), None
  m = re.match(r"^input_proj_(\d+)$", head)
  if m:
    sub = {"conv": "0", "group_norm": "1"}[path[1]]
    return f"input_proj.{m.group(1)}.{sub}.{torch_leaf}", ("conv" if leaf == "kernel" else "copy"), None
  if head == "query_embed":
    return "query_embed.weight", "copy", None
  m = re.match(r"^(class_embed|bbox_embed)(?:_(\d+))?$", head)
  if m:
    k = m.group(2) or "0"
    mid = "".join(f".{p.replace('layers_', 'layers.')}" for p in path[1:-1])
    return f"{m.group(1)}.{k}{mid}.{torch_leaf}", transform, None
  if head == "transformer":
    rest = list(path[1:-1])
    if not rest:  # level_embed
      return f"transformer.{leaf}", "copy", None
    names = ["transformer"]
    slice_index = None
    for p in rest:
      if p.startswith("layers_"):
        names.append("layers." + p[len("layers_"):])
      elif p == "ffn":
        continue
      elif p in ("q_proj", "k_proj", "v_proj"):
        slice_index = "qkv".index(p[0])
        torch_leaf = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
      else:
        names.append(p)
    return ".".join(names + [torch_leaf]), transform, slice_index
  raise KeyError(f"no official name for Flax parameter {'/'.join(path)}")


def _to_flax(value: np.ndarray, transform: str, slice_index: Optional[int]) -> np.ndarray:
  if slice_index is not None:
    n = value.shape[0] // 3
    value = value[slice_index * n:(slice_index + 1) * n]
  if transform == "dense":
    return value.T if value.ndim == 2 else value
  if transform == "conv":
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
  return value


def expected_param_shapes(config) -> dict:
  """Shapes of the Flax params of config's model (no compute: jax.eval_shape)."""
  from ddetr_jax.models import build_model
  model = build_model(config)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 64, 64), jnp.bool_)
  return jax.eval_shape(model.init, jax.random.key(0), images, mask)["params"]


def describe_checkpoint(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Architecture facts read from an official-named state_dict (variant, depth, sizes)."""
  keys = set(state_dict)
  levels = len({k.split(".")[1] for k in keys if k.startswith("input_proj.")})
  two_stage = "transformer.enc_output.weight" in keys
  refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in keys)
  if not refine and "class_embed.0.weight" in keys and "class_embed.1.weight" in keys:
    refine = not np.array_equal(state_dict["class_embed.0.weight"], state_dict["class_embed.1.weight"]) or (
        "bbox_embed.1.layers.0.weight" in keys and not np.array_equal(
            state_dict["bbox_embed.0.layers.0.weight"], state_dict["bbox_embed.1.layers.0.weight"]))
  if two_stage:
    variant = "two_stage"
  elif refine:
    variant = "box_refine"
  elif levels == 1:
    variant = "single_scale (or single_scale_dc5: dilation changes no weights)"
  elif levels > 1:
    variant = "default"
  else:
    variant = "backbone only"
  facts = {"variant": variant, "num_feature_levels": levels, "with_box_refine": refine or two_stage,
           "two_stage": two_stage}
  layer3 = {k.split(".")[4] for k in keys if k.startswith("backbone.0.body.layer3.")}
  if layer3:
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in keys
    facts["backbone_depth"] = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}.get(
        (len(layer3), bottleneck), f"unknown ({len(layer3)} layer3 blocks)")
  return facts


def params_from_state_dict(state_dict: Mapping[str, Any], config, init_params: Optional[dict] = None) -> dict:
  """Converts a PyTorch state_dict (any accepted layout) to the Flax params of `config.model`.

  Args:
    state_dict: {name: torch tensor or array}.
    config: full config (uses config.model; config.variant, if present, names the variant in errors).
    init_params: only for a backbone-only (torchvision ResNet) checkpoint: the params whose
      `backbone` subtree is replaced. Without it, such a checkpoint returns {'backbone': ...}.
  Returns:
    the params pytree (nested dicts of float32 numpy arrays).
  Raises:
    CheckpointError listing every missing key, unused key and shape mismatch at once.
  """
  norm = config.model.get("backbone_norm", "frozen_bn")
  if norm != "frozen_bn":
    raise CheckpointError(f"PyTorch checkpoints hold frozen BatchNorm backbones; "
                          f"config.model.backbone_norm={norm!r} cannot load them (use 'frozen_bn')")
  width = config.model.get("backbone_width", 64)
  if width != 64:
    raise CheckpointError(f"PyTorch checkpoints hold torchvision ResNets of width 64; "
                          f"config.model.backbone_width={width!r} cannot load them (use 64)")
  state_dict, layout = to_official_names(to_numpy_state_dict(state_dict))
  expected = expected_param_shapes(config)
  flat_expected = {tuple(str(k.key) for k in path): leaf.shape
                   for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
  backbone_only = layout == "torchvision_resnet"
  if backbone_only:
    flat_expected = {p: s for p, s in flat_expected.items() if p[0] == "backbone"}

  ignored = sorted(k for k in state_dict if k.endswith(_IGNORED_SUFFIXES)
                   or (backbone_only and k.startswith("backbone.0.body.fc.")))
  used, missing, mismatched, flat = set(ignored), [], [], {}
  for path, shape in sorted(flat_expected.items()):
    key, transform, slice_index = _official_name(path)
    if key not in state_dict:
      missing.append(f"{key} (for {'/'.join(path)}, shape {tuple(shape)})")
      continue
    used.add(key)
    value = _to_flax(state_dict[key], transform, slice_index)
    if value.shape != tuple(shape):
      mismatched.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} -> {value.shape}, "
                        f"model {'/'.join(path)} expects {tuple(shape)}")
      continue
    flat[path] = value.astype(np.float32)

  # Copies of heads: shared heads saved per layer, and the decoder's refinement/two-stage aliases.
  differing = []
  for key in state_dict:
    m = _HEAD_RE.match(key)
    if not m or key in used:
      continue
    primary = f"{m.group(2)}.{0 if not config.model.with_box_refine else m.group(3)}.{m.group(4)}"
    if primary in used and primary in state_dict:
      if state_dict[primary].shape == state_dict[key].shape and np.array_equal(state_dict[primary], state_dict[key]):
        used.add(key)
      else:
        differing.append(key)
  unused = sorted(set(state_dict) - used)

  m = config.model
  facts = describe_checkpoint(state_dict) if not backbone_only else {}
  wrong_variant = not backbone_only and (facts["with_box_refine"], facts["two_stage"],
                                         facts["num_feature_levels"]) != (
      bool(m.with_box_refine), bool(m.two_stage), m.num_feature_levels)
  if missing or unused or mismatched or wrong_variant:
    lines = [f"checkpoint ({layout} layout) does not fit the model of config variant "
             f"{config.get('variant', '?')!r} (backbone_depth={m.backbone_depth}, "
             f"num_feature_levels={m.num_feature_levels}, with_box_refine={m.with_box_refine}, "
             f"two_stage={m.two_stage}):"]
    if wrong_variant:
      lines.append(f"  the checkpoint fits variant {facts['variant']!r} ({facts})")
    if differing:
      lines.append(f"  per-layer heads differ ({len(differing)} tensors, e.g. {differing[0]}): "
                   "the checkpoint has box refinement")
    for title, items in (("missing", missing), ("unused", unused), ("shape mismatch", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" + (f" {tuple(state_dict[item].shape)}" if title == "unused" else "")
                     for item in items)
    raise CheckpointError("\n".join(lines))

  params: dict = {}
  for path, value in flat.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  if backbone_only and init_params is not None:
    merged = dict(jax.tree_util.tree_map(np.asarray, dict(init_params)))
    merged["backbone"] = params["backbone"]
    return merged
  return params


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config) -> dict:
  """Flax params from a HuggingFace DeformableDetrForObjectDetection state_dict (hub or in-memory names)."""
  if not any(k.startswith("model.") for k in state_dict):
    raise CheckpointError("not a HuggingFace state_dict: no key starts with 'model.'")
  return params_from_state_dict(state_dict, config)


def load_torch_params(path: str, config, init_params: Optional[dict] = None) -> dict:
  """Reads and converts a PyTorch checkpoint file; see `params_from_state_dict`."""
  try:
    return params_from_state_dict(read_state_dict(path), config, init_params)
  except CheckpointError as e:
    if str(e).startswith(path):
      raise
    raise CheckpointError(f"{path}: {e}") from None


def save_params(params: dict, out_dir: str) -> None:
  """Writes {'params': params} as an orbax (StandardCheckpointer) checkpoint in out_dir."""
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(out_dir), {"params": jax.tree_util.tree_map(jnp.asarray, params)},
                    force=True)
  checkpointer.wait_until_finished()


def main(argv) -> None:
  del argv
  from absl import flags
  config = flags.FLAGS.config
  init_params = None
  state_dict, layout = to_official_names(read_state_dict(flags.FLAGS.torch_checkpoint))
  if layout == "torchvision_resnet":
    from ddetr_jax.models import build_model
    images, mask = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
    init_params = jax.jit(build_model(config).init)(jax.random.key(flags.FLAGS.seed), images, mask)["params"]
  try:
    params = params_from_state_dict(state_dict, config, init_params)
  except CheckpointError as e:
    raise SystemExit(f"{flags.FLAGS.torch_checkpoint}: {e}") from None
  save_params(params, flags.FLAGS.out)
  count = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  print(f"converted {flags.FLAGS.torch_checkpoint} ({layout}, {count} parameters) -> {flags.FLAGS.out}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  flags.DEFINE_string("torch_checkpoint", None, "PyTorch checkpoint (.pth/.bin/.safetensors).", required=True)
  flags.DEFINE_string("out", None, "Output directory of the orbax checkpoint.", required=True)
  flags.DEFINE_integer("seed", 0, "Init seed for the non-backbone params of a backbone-only checkpoint.")
  config_flags.DEFINE_config_file("config", None, "configs/deformable_detr.py:VARIANT", lock_config=True)
  app.run(main)
