"""Builds randomly initialised HuggingFace Deformable DETR models (no download) for parity tests,
and checks the reference itself (DC5 patch of HF's ResNet). `hf_config` and `hf_resnet_config`
also serve benchmarks/train_step.py, which times HF's model (benchmarks/eval.py uses
`build_hf_model`)."""
import numpy as np
import torch
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

_RESNET = {18: ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
           34: ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
           50: ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048])}


def hf_resnet_config(depth: int, out_features: list[str]) -> ResNetConfig:
  """HF's ResNet of `depth` (18, 34, 50; a 64-channel stem), returning `out_features`."""
  layer_type, depths, sizes = _RESNET[depth]
  return ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=sizes, embedding_size=64,
                      out_features=out_features)


def hf_config(model_config, dropout: float = 0.0, auxiliary_loss: bool = True
              ) -> DeformableDetrConfig:
  """HF's config for `config.model` (ml_collections): the same dims, layers, queries, levels,
  points and variant, an HF ResNet of the same depth (no pretrained weights, nothing fetched),
  `dropout` where HF applies its `dropout` (attention and activation dropout off)."""
  m = model_config
  out_features = ["stage2", "stage3", "stage4"] if m.num_feature_levels > 1 else ["stage4"]
  return DeformableDetrConfig(
      use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
      backbone_config=hf_resnet_config(m.backbone_depth, out_features), d_model=m.hidden_dim,
      encoder_layers=m.enc_layers, decoder_layers=m.dec_layers, encoder_attention_heads=m.nheads,
      decoder_attention_heads=m.nheads, encoder_ffn_dim=m.dim_feedforward,
      decoder_ffn_dim=m.dim_feedforward, num_queries=m.num_queries,
      two_stage_num_proposals=m.num_queries, num_labels=m.num_classes,
      num_feature_levels=m.num_feature_levels, enc_n_points=m.enc_n_points,
      encoder_n_points=m.enc_n_points, decoder_n_points=m.dec_n_points,
      with_box_refine=m.with_box_refine, two_stage=m.two_stage, auxiliary_loss=auxiliary_loss,
      dropout=dropout, attention_dropout=0.0, activation_dropout=0.0)


def _dilate_last_stage(model, layer_type: str) -> None:
  """Patches HF's ResNet layer4 like torchvision's replace_stride_with_dilation (HF's own ResNet
  has no DC5 option): block 0 loses its stride, later blocks get dilation 2 in their 3x3 convs."""
  stage = model.model.backbone.model.encoder.stages[3]
  for i, block in enumerate(stage.layers):
    convs = [block.layer[0].convolution, block.layer[1].convolution] if layer_type == "basic" \
        else [block.layer[1].convolution]
    for conv in convs:
      if i == 0:
        conv.stride = (1, 1)
      else:
        conv.dilation, conv.padding = (2, 2), (2, 2)
    if i == 0:
      block.shortcut.convolution.stride = (1, 1)


def build_hf_model(model_config, seed: int = 0) -> DeformableDetrForObjectDetection:
  """HF model matching `config.model` (ml_collections) with every weight and buffer randomised."""
  m = model_config
  torch.manual_seed(seed)
  model = DeformableDetrForObjectDetection(hf_config(m)).eval()
  if m.dilation:
    _dilate_last_stage(model, _RESNET[m.backbone_depth][0])
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
      if name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=gen))
      elif name.endswith(("running_mean", ".bias")):
        b.copy_(0.1 * torch.randn(b.shape, generator=gen))
      elif name.endswith(".weight"):
        b.copy_(0.5 + 0.5 * torch.rand(b.shape, generator=gen))
  return model


def hf_outputs(model, images_nhwc: np.ndarray, padding_mask: np.ndarray) -> dict:
  """Runs HF on our inputs; returns numpy outputs in our dict layout (aux via HF's loss path)."""
  pixel_values = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  pixel_mask = torch.from_numpy(~padding_mask).long()
  labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
            for _ in range(images_nhwc.shape[0])]
  with torch.no_grad():
    out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
  result = {"pred_logits": out.logits.numpy(), "pred_boxes": out.pred_boxes.numpy(),
            "aux_outputs": [{"pred_logits": a["logits"].numpy(), "pred_boxes": a["pred_boxes"].numpy()}
                            for a in out.auxiliary_outputs]}
  if out.enc_outputs_class is not None:
    result["enc_outputs"] = {"pred_logits": out.enc_outputs_class.numpy(),
                             "pred_boxes": torch.sigmoid(out.enc_outputs_coord_logits).numpy()}
  return result


def test_dc5_patch_halves_hf_layer4_stride():
  from configs import tiny
  config = tiny.get_config("single_scale_dc5")
  plain = build_hf_model(tiny.get_config("single_scale").model)
  dilated = build_hf_model(config.model)
  x = torch.zeros(1, 3, 64, 96)
  with torch.no_grad():
    assert plain.model.backbone.model(x).feature_maps[-1].shape[-2:] == (2, 3)
    assert dilated.model.backbone.model(x).feature_maps[-1].shape[-2:] == (4, 6)
