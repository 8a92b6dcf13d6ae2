"""Masks, valid ratios and sine encodings against PyTorch / HF transformers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.deformable_detr import modeling_deformable_detr as hf

from ddetr_jax.models.masks import resize_padding_mask, valid_ratios
from ddetr_jax.models.position_encoding import proposal_sine_embedding, sine_position_encoding


def _random_padding_mask(sizes, shape):
  mask = np.ones((len(sizes),) + shape, bool)
  for i, (h, w) in enumerate(sizes):
    mask[i, :h, :w] = False
  return mask


@pytest.mark.parametrize("shape,out", [((683, 512), (86, 64)), ((100, 133), (13, 17)),
                                        ((97, 61), (4, 2)), ((7, 5), (14, 11))])
def test_mask_resize_matches_torch_legacy_nearest(shape, out):
  mask = _random_padding_mask([(shape[0] - 3, shape[1] // 2), shape], shape)
  expected = F.interpolate(torch.from_numpy(mask)[None].float(), size=out).to(torch.bool)[0].numpy()
  np.testing.assert_array_equal(np.asarray(resize_padding_mask(mask, out)), expected)


def test_valid_ratios():
  mask = _random_padding_mask([(3, 8), (6, 2)], (6, 8))
  np.testing.assert_allclose(valid_ratios(mask), [[1.0, 0.5], [0.25, 1.0]])


def test_sine_encoding_matches_hf():
  mask = _random_padding_mask([(5, 7), (9, 11), (2, 11)], (9, 11))
  expected = hf.DeformableDetrSinePositionEmbedding.build_sine_position_embedding(
      (3, 256, 9, 11), "cpu", torch.float32, 128, normalize=True, scale=2 * np.pi, temperature=10000,
      mask=torch.from_numpy(~mask))  # HF's mask is 1 = valid
  ours = np.asarray(sine_position_encoding(mask, 128))
  valid = ~mask
  np.testing.assert_allclose(ours[valid], expected.permute(0, 2, 3, 1).numpy()[valid], atol=1e-5)


def test_proposal_embedding_matches_hf():
  logits = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))

  class _Cfg:
    d_model = 256
  expected = hf.DeformableDetrModel.get_proposal_pos_embed(type("M", (), {"config": _Cfg})(), logits)
  np.testing.assert_allclose(np.asarray(proposal_sine_embedding(logits.numpy(), 128)), expected.numpy(),
                             atol=1e-5)
