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
reported together (`CheckpointError`), and a checkpoint of another variant is named (one line).

CLI: python -m ddetr_jax.convert --torch_checkpoint PATH --config configs/deformable_detr.py:VARIANT --out DIR
  --out must not exist or be empty; `--overwrite` replaces a checkpoint this tool wrote there before,
  and nothing else (a folder with other content is never deleted). Errors in the flags, the
  checkpoint or --out print `error: ...` and exit with status 2; `--verbosity=0` shows orbax's
  INFO logs.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddetr_jax import errors
from ddetr_jax import output_folder

# Per-module entries that are not parameters: BatchNorm counters, thop profiling counters.
_IGNORED_SUFFIXES = ("num_batches_tracked", "total_params", "total_ops")
_HEAD_RE = re.compile(r"^(transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.*)$")


class CheckpointError(errors.InvalidInputError):
  """A checkpoint that cannot be loaded into the configured model; the message says why."""


class MissingCheckpointError(CheckpointError, errors.MissingInputError):
  """A checkpoint file that does not exist (also a FileNotFoundError)."""


# ----------------------------------------------------------------------------- reading files

# What torch.load's weights-only unpickler says when the file holds objects other than tensors
# and plain containers (a class, a function to call): the file is a checkpoint, refused on purpose.
_REFUSAL_RE = re.compile(r"GLOBAL|add_safe_globals|allowlisted|must be imported|unrecognized function")


def _first_sentence(text: str) -> str:
  """The first non-empty line of `text`, cut after its first sentence; without the
  `[enforce fail at file.cc:N] .` prefix of torch's C++ errors."""
  line = next((l.strip() for l in text.splitlines() if l.strip()), "")
  line = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", line)
  return re.split(r"(?<=\.)\s", line, maxsplit=1)[0]


# Lines of torch.load's weights-only message that are advice, not the reason.
_TORCH_ADVICE_RE = re.compile(r"In PyTorch 2\.6|This file can still be loaded|Please file an issue|"
                              r"Check the documentation|\(\d\) ")


def _torch_load_reason(e: Exception) -> str:
  """`Type: reason` of a torch.load failure; for a weights-only failure, the unpickler's reason
  (e.g. `Unsupported global: GLOBAL a.B was not an allowed global by default.`), not the advice
  torch wraps it in."""
  lines = []
  for line in str(e).splitlines():
    line = line.split("WeightsUnpickler error:", 1)[-1]
    line = re.sub(r"^\s*Weights only load failed\.\s*", "", line).strip()
    if line and not _TORCH_ADVICE_RE.match(line):
      lines.append(line)
  reason = _first_sentence("\n".join(lines))
  if not reason and isinstance(e, EOFError):
    reason = "the file ends early"
  return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


def _not_a_torch_file(path: str) -> Optional[str]:
  """Why the file at `path` cannot be a torch.save file (None if it may be one).

  torch.save writes a zip archive holding `<name>/data.pkl`, or (legacy format) a pickle that
  starts with torch's magic number.
  """
  import zipfile
  import torch
  with open(path, "rb") as f:
    head = f.read(64)
  if not head:
    return "the file is empty"
  if head.startswith(b"PK\x03\x04"):
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
      return None  # a zip archive cut short: torch's reason says so.
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
      return f"it is a zip archive without the data.pkl that torch.save writes (it holds {names[:3]})"
    return None
  magic = torch.serialization.MAGIC_NUMBER
  if any(head.startswith(pickle.dumps(magic, protocol=p)) for p in range(pickle.HIGHEST_PROTOCOL + 1)):
    return None
  if head[8:10] == b'{"':
    return "it looks like a safetensors file: give it the .safetensors suffix"
  kind = "a pickle, but not one written by torch.save" if head.startswith(b"\x80") else "not a pickle"
  return f"it is neither a zip archive nor a legacy torch.save file ({kind}; it starts with {head[:16]!r})"


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into {name: float32/int numpy array} without running pickled code.

  `.safetensors` is read with safetensors; anything else with `torch.load(weights_only=True)`.
  A dict with a `model` (official) or `state_dict` entry is unwrapped. Non-tensor entries (epoch,
  args, optimizer state, ...) outside the state_dict are dropped.

  Raises:
    MissingCheckpointError: `path` does not exist.
    CheckpointError (the message starts with `path`): `path` is a folder, is not a PyTorch or
      safetensors file, is truncated or corrupt, holds objects that loading would have to run
      code for (refused), or holds no state_dict.
  """
  if not os.path.exists(path):
    raise MissingCheckpointError(f"{path}: no such checkpoint file")
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a folder; name the checkpoint file (.pth, .bin or "
                          ".safetensors)")
  if path.endswith(".safetensors"):
    from safetensors.torch import load_file
    try:
      tensors = load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - any failure is reported with the file name.
      raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
  else:
    import torch
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt/foreign files raise various errors.
      reason = _torch_load_reason(e)
      try:
        not_torch = _not_a_torch_file(path)
      except OSError as read_error:
        raise CheckpointError(f"{path}: cannot read the file: {read_error.strerror or read_error}") from e
      if not_torch:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: {not_torch} (torch.load: {reason})") from e
      if isinstance(e, pickle.UnpicklingError) and _REFUSAL_RE.search(reason):
        raise CheckpointError(
            f"{path}: refusing to load: the file holds objects other than tensors and plain "
            f"containers, which only arbitrary unpickling (possibly running code) could load. "
            f"Re-save its state_dict with torch.save(state_dict) or convert it to safetensors. "
            f"torch.load: {reason}") from e
      raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                            f"{reason}") from e
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
  from ddetr_jax.data import batching
  from ddetr_jax.models import build_model
  model = build_model(config)
  image_shape, mask_shape = batching.init_shapes(config.data)  # as the trainer initialises it.
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  mask = jax.ShapeDtypeStruct(mask_shape, jnp.bool_)
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
  config_facts = (f"num_feature_levels={m.num_feature_levels}, with_box_refine={m.with_box_refine}, "
                  f"two_stage={m.two_stage}, backbone_depth={m.backbone_depth}")
  if wrong_variant and facts["num_feature_levels"]:
    # One line: the missing/unused keys all follow from the other variant.
    found = ", ".join(f"{k}={v}" for k, v in facts.items() if k != "variant")
    raise CheckpointError(
        f"the checkpoint fits variant {facts['variant']!r} ({found}), not config variant "
        f"{config.get('variant', '?')!r} ({config_facts}); convert it with the config of its variant")
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


def with_path(error: CheckpointError, path: str) -> CheckpointError:
  """`error`, its message prefixed with `path: ` unless it already starts with it."""
  return error if str(error).startswith(path) else CheckpointError(f"{path}: {error}")


def load_torch_params(path: str, config, init_params: Optional[dict] = None) -> dict:
  """Reads and converts a PyTorch checkpoint file; see `params_from_state_dict`.

  Raises:
    CheckpointError (MissingCheckpointError for a file that is not there), its message starting
    with `path`.
  """
  try:
    return params_from_state_dict(read_state_dict(path), config, init_params)
  except CheckpointError as e:
    raise with_path(e, path) from None


# Top-level entries of an orbax StandardCheckpointer checkpoint (OCDBT; older and newer orbax
# versions' names included). A folder holding anything else is not one `save_params` wrote.
_ORBAX_ENTRY_RE = re.compile(r"_CHECKPOINT_METADATA|_METADATA|_sharding|_strings\.json|array_metadatas"
                             r"|commit_success\.txt|d|descriptor|manifest\.ocdbt|ocdbt\.process_\d+")


def _not_a_converted_checkpoint(out_dir: str) -> Optional[str]:
  """Why the folder `out_dir` is not a checkpoint written by `save_params` (None if it is one).

  One is an orbax checkpoint (both metadata files, no entry orbax does not write) of a single
  tree under 'params'.
  """
  names = sorted(os.listdir(out_dir))
  others = [n + ("/" if os.path.isdir(os.path.join(out_dir, n)) else "") for n in names
            if not _ORBAX_ENTRY_RE.fullmatch(n)]
  if others:
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    return f"it holds {', '.join(others[:5])}{more}"
  missing = [n for n in ("_CHECKPOINT_METADATA", "_METADATA")
             if not os.path.isfile(os.path.join(out_dir, n))]
  if missing:
    return f"it has no orbax {' or '.join(missing)} file"
  try:
    with open(os.path.join(out_dir, "_METADATA")) as f:
      tree = json.load(f)["tree_metadata"]
    top_keys = {entry["key_metadata"][0]["key"] for entry in tree.values()}
  except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
    return "its _METADATA is not an orbax tree's"
  if top_keys != {"params"}:
    return f"its tree is {sorted(top_keys)[:5]}, not the {{'params': ...}} this tool writes"
  return None


def check_out_dir(out_dir: str, overwrite: bool = False) -> None:
  """Checks that `save_params` may write to `out_dir`; deletes nothing.

  Allowed: a path that does not exist, an empty folder, and (with `overwrite`) a folder holding
  a checkpoint `save_params` wrote, which the save replaces. Anything else (a file, a folder with
  other content such as a training workdir) is refused, with or without `overwrite`.

  Every check is made on the folder the save will write, `os.path.realpath(out_dir)` (so
  `missing/..` or a symbolic link is judged by what it resolves to).

  Raises:
    errors.InvalidInputError naming `out_dir`.
  """
  if not out_dir:
    raise errors.InvalidInputError("--out is empty; name a new folder for the converted checkpoint")
  resolved = os.path.realpath(out_dir)
  if resolved != out_dir:
    out_dir = f"{out_dir} (= {resolved})"
  if not os.path.lexists(resolved):
    problem = output_folder.why_not_creatable(resolved)
    if problem:
      raise errors.InvalidInputError(f"{out_dir}: cannot be created: {problem}; name a new "
                                     "folder for the converted checkpoint")
    return
  if not os.path.isdir(resolved):
    what = "is a file" if os.path.isfile(resolved) else "exists"
    raise errors.InvalidInputError(f"{out_dir}: {what}, not a folder; name a new folder for the "
                                   "converted checkpoint")
  if not os.listdir(resolved):
    return
  if not overwrite:
    raise errors.InvalidInputError(
        f"{out_dir}: the folder exists and is not empty; name a new folder, or pass --overwrite "
        "to replace a checkpoint converted into it before")
  why = _not_a_converted_checkpoint(resolved)
  if why:
    raise errors.InvalidInputError(
        f"{out_dir}: not replaced, even with --overwrite: it is not a checkpoint written by "
        f"ddetr_jax.convert ({why}); name a new folder")


def save_params(params: dict, out_dir: str, overwrite: bool = False) -> None:
  """Writes {'params': params} as an orbax (StandardCheckpointer) checkpoint in out_dir.

  `out_dir` must not exist, be empty, or (with `overwrite`) hold a checkpoint written by this
  function, which is then replaced; see `check_out_dir`, which raises errors.InvalidInputError
  for anything else.
  """
  import orbax.checkpoint as ocp
  check_out_dir(out_dir, overwrite)
  directory = os.path.realpath(out_dir)  # a symbolic link to a folder: replace the folder.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, {"params": jax.tree_util.tree_map(jnp.asarray, params)},
                    force=os.path.exists(directory))
  checkpointer.wait_until_finished()


def main(argv) -> None:
  """The CLI (see the module docstring); `cli.run` prints its user errors as one line."""
  from absl import app
  from absl import flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  path, out_dir, config = FLAGS.torch_checkpoint, FLAGS.out, FLAGS.config
  check_out_dir(out_dir, FLAGS.overwrite)  # before the conversion, which can take a while.
  state_dict = read_state_dict(path)
  try:
    layout = to_official_names(state_dict)[1]
    init_params = None
    if layout == "torchvision_resnet":
      from ddetr_jax.data import batching
      from ddetr_jax.models import build_model
      image_shape, mask_shape = batching.init_shapes(config.data)
      images, mask = jnp.zeros(image_shape), jnp.zeros(mask_shape, bool)
      init_params = jax.jit(build_model(config).init)(jax.random.key(FLAGS.seed), images, mask)["params"]
    params = params_from_state_dict(state_dict, config, init_params)
  except CheckpointError as e:
    raise with_path(e, path) from None
  save_params(params, out_dir, FLAGS.overwrite)
  count = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  print(f"converted {path} ({layout}, {count} parameters) -> {out_dir}")


if __name__ == "__main__":
  import sys
  from absl import flags
  from ml_collections import config_flags
  from ddetr_jax import cli
  flags.DEFINE_string("torch_checkpoint", None, "PyTorch checkpoint (.pth/.bin/.safetensors).", required=True)
  flags.DEFINE_string("out", None, "Output folder of the orbax checkpoint: new or empty, or see "
                      "--overwrite.", required=True)
  flags.DEFINE_bool("overwrite", False, "Replace --out if it holds a checkpoint converted before. "
                    "A folder with anything else in it is never deleted.")
  flags.DEFINE_integer("seed", 0, "Init seed for the non-backbone params of a backbone-only checkpoint.")
  if any(re.fullmatch(r"--?config(=.*)?", arg) for arg in sys.argv[1:]):  # else absl says it is required.
    cli.check_config_overrides(sys.argv, "")  # before ml_collections applies the overrides.
  config_flags.DEFINE_config_file("config", None, "Config file (`configs/deformable_detr.py:VARIANT`).",
                                  lock_config=True)
  flags.mark_flag_as_required("config")
  cli.run(main)
