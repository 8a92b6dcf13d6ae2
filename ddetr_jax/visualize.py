"""Pictures of what the model sees: detections, and the deformable sampling points behind one.

`draw_detections` writes boxes, class names and scores on an image (PIL).
`last_decoder_sampling` runs the detector and also returns, for the last decoder layer's
deformable cross-attention, the sampling locations and attention weights it used:
  sampling_locations  [B, Q, M, L, P, 2] normalised (x, y) over the padded image
  attention_weights   [B, Q, M, L, P]    softmax over L * P per head
`plot_sampling_points` draws them for one detection, one panel per feature level, each point
coloured by its attention weight (like Fig. 5 of the paper), and returns the drawn coordinates.

How the values are obtained: `MSDeformAttn` sows the locations and weights it hands to the
sampler (collection 'intermediates', names `sampling_locations` and `sampling_weights`); this
module reads those of `transformer/decoder/layers_{dec_layers - 1}/cross_attn`.
"""
import colorsys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

_COLLECTION = "intermediates"


def class_color(label: int) -> tuple[int, int, int]:
  """A distinct, saturated RGB colour per label id (golden-ratio hue steps)."""
  r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
  return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    class_names: Sequence[str], threshold: float = 0.0) -> Image.Image:
  """Draws the detections scoring above `threshold` on a copy of `image`.

  Args:
    image: [H, W, 3] uint8 RGB (the original image).
    boxes: [K, 4] xyxy in `image` pixels; labels: [K] label ids; scores: [K].
    class_names: name per label id (a missing name is drawn as the id).
    threshold: only detections with score > threshold are drawn.
  Returns:
    the annotated PIL image.
  """
  canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  width = max(1, round(max(canvas.size) / 400))
  order = np.argsort(-np.asarray(scores), kind="stable")  # highest score drawn last (on top)
  for k in order[::-1]:
    if scores[k] <= threshold:
      continue
    label = int(labels[k])
    name = class_names[label] if 0 <= label < len(class_names) else str(label)
    color = class_color(label)
    x0, y0, x1, y1 = (float(v) for v in boxes[k])
    draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
    text = f"{name} {float(scores[k]):.2f}"
    left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
    top_y = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
    draw.rectangle([x0, top_y, x0 + (right - left) + 4, top_y + (bottom - top) + 2], fill=color)
    draw.text((x0 + 2, top_y), text, fill=(0, 0, 0), font=font)
  return canvas


def _cross_attn_path(model) -> tuple[str, ...]:
  return ("transformer", "decoder", f"layers_{model.dec_layers - 1}", "cross_attn")


def _get(tree: Any, path: Sequence[str]) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def last_decoder_sampling(model, params, images: jax.Array, padding_mask: jax.Array) -> dict:
  """Detector outputs plus the last decoder layer's deformable sampling (jittable).

  Args:
    model: the DeformableDETR module; params: its 'params' pytree.
    images: [B, H, W, 3] normalized; padding_mask: [B, H, W] bool, True = padding.
  Returns dict: `pred_logits` [B, Q, C], `pred_boxes` [B, Q, 4], `sampling_locations`
    [B, Q, M, L, P, 2] (x, y) in [0, 1] of the padded image (H, W), `attention_weights`
    [B, Q, M, L, P]: exactly what the layer passed to the sampler.
  """
  target = _cross_attn_path(model)
  outputs, state = model.apply({"params": params}, images, padding_mask, train=False,
                               mutable=[_COLLECTION])
  sown = _get(state.get(_COLLECTION, {}), target) or {}
  if "sampling_locations" not in sown or "sampling_weights" not in sown:
    raise ValueError(f"the model sowed no deformable sampling at {'/'.join(target)}")
  return {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"],
          "sampling_locations": sown["sampling_locations"][-1].astype(jnp.float32),
          "attention_weights": sown["sampling_weights"][-1].astype(jnp.float32)}


def sampling_points_in_image(locations: np.ndarray, padded_size: Sequence[int],
                             size: Sequence[int], orig_size: Sequence[int]) -> np.ndarray:
  """Normalised sampling locations -> pixel coordinates of the original image.

  Args:
    locations: [..., 2] (x, y) in [0, 1] of the padded model input.
    padded_size: (H, W) of the padded input; size: (h, w) of the resized image inside it;
    orig_size: (h, w) of the original image.
  Returns:
    [..., 2] (x, y) in original-image pixels (x = loc_x * W * orig_w / w).
  """
  scale = np.array([padded_size[1] * orig_size[1] / size[1],
                    padded_size[0] * orig_size[0] / size[0]], np.float64)
  return np.asarray(locations, np.float64) * scale


def plot_sampling_points(image: np.ndarray, locations: np.ndarray, weights: np.ndarray,
                         padded_size: Sequence[int], size: Sequence[int], path: str,
                         box: Optional[np.ndarray] = None, title: str = "",
                         spatial_shapes: Optional[Sequence[Sequence[int]]] = None) -> dict:
  """Writes one picture: per feature level, the sampling points of one query over the image.

  Args:
    image: [h0, w0, 3] uint8 original image.
    locations: [M, L, P, 2] normalised (x, y) of the padded input (one query's
      `sampling_locations`); weights: [M, L, P] its attention weights.
    padded_size: (H, W) of the padded input; size: (h, w) of the resized image.
    path: output file (.png / .jpg).
    box: optional [4] xyxy detection box in original pixels, drawn in every panel.
    title: figure title; spatial_shapes: optional (H_l, W_l) per level for the panel titles.
  Returns dict: `points` [L, M * P, 2] the (x, y) in original pixels and `weights` [L, M * P] the
    colour values, both read back from the plotted matplotlib artists, in (head, point) order.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  locations, weights = np.asarray(locations), np.asarray(weights)
  num_heads, num_levels, num_points = weights.shape
  if locations.shape != (num_heads, num_levels, num_points, 2):
    raise ValueError(f"locations must be [M, L, P, 2] = {weights.shape + (2,)}, got "
                     f"{locations.shape}")
  orig_size = image.shape[:2]
  points = sampling_points_in_image(locations, padded_size, size, orig_size)  # [M, L, P, 2]
  points = np.moveaxis(points, 1, 0).reshape(num_levels, num_heads * num_points, 2)
  values = np.moveaxis(weights, 1, 0).reshape(num_levels, num_heads * num_points)
  vmax = float(values.max()) if values.size else 1.0
  drawn_points, drawn_weights = np.zeros_like(points), np.zeros_like(values)
  fig, axes = plt.subplots(1, num_levels, figsize=(4.5 * num_levels, 4.8), squeeze=False)
  scatter = None
  for level, ax in enumerate(axes[0]):
    ax.imshow(image)
    if box is not None:
      x0, y0, x1, y1 = (float(v) for v in box)
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime",
                                 linewidth=1.5))
    order = np.argsort(values[level], kind="stable")  # heaviest points on top
    scatter = ax.scatter(points[level, order, 0], points[level, order, 1],
                         c=values[level, order], cmap="jet", vmin=0.0, vmax=vmax, s=18,
                         edgecolors="white", linewidths=0.3)
    drawn_points[level, order] = np.asarray(scatter.get_offsets())  # what matplotlib holds
    drawn_weights[level, order] = np.asarray(scatter.get_array())
    shape = f" ({spatial_shapes[level][0]}x{spatial_shapes[level][1]})" if spatial_shapes else ""
    ax.set_title(f"level {level}{shape}")
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.axis("off")
  fig.colorbar(scatter, ax=axes[0].tolist(), fraction=0.02, label="attention weight")
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return {"points": drawn_points, "weights": drawn_weights}
