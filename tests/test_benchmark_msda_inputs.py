"""The sampler benchmark's two input distributions are what its table says they are."""
import numpy as np
import pytest

from benchmarks import msda


@pytest.fixture(autouse=True)
def small_levels(monkeypatch):
  monkeypatch.setattr(msda, "LEVELS", ((12, 20), (6, 10), (3, 5)))


def _in_pixels(loc, levels):
  """Normalized (B, Q, M, L, P, 2) offsets -> the same in each level's pixels."""
  sizes = np.array([(w, h) for h, w in levels], np.float64)  # [L, 2]
  return loc * sizes[:, None, :]


def test_local_encoder_locations_stay_near_each_query_pixel():
  levels = msda.LEVELS
  s = sum(h * w for h, w in levels)
  _, loc, attn = msda._inputs(2, s, locations="local")
  assert loc.shape == (2, s, msda.M, len(levels), msda.P, 2)
  # Query 0 is pixel (0, 0) of level 0 and the last query the last pixel of the last level.
  refs = msda._reference_points(s, np.random.default_rng(0))
  h0, w0 = levels[0]
  np.testing.assert_allclose(refs[0], [0.5 / w0, 0.5 / h0])
  np.testing.assert_allclose(refs[-1], [1 - 0.5 / levels[-1][1], 1 - 0.5 / levels[-1][0]])
  offsets_px = _in_pixels(loc - refs[None, :, None, None, None, :], levels)
  # Official pattern: point p at distance p + 1 (max-norm) along the head's direction, plus
  # N(0, 2^2) pixels of noise (which adds a pixel or so to the mean distance): far from
  # uniform locations, a third of the map away on average.
  mean_px = np.abs(offsets_px).max(-1).mean(axis=(0, 1, 2, 3))  # [P]
  expected = np.arange(1, msda.P + 1)
  assert np.all(np.diff(mean_px) > 0), mean_px
  assert np.all((mean_px > expected - 0.5) & (mean_px < expected + 2.0)), mean_px
  np.testing.assert_allclose(attn.sum(axis=(-1, -2)), 1.0, rtol=1e-5)


def test_uniform_locations_cover_the_map_and_unknown_kind_is_refused():
  _, loc, _ = msda._inputs(1, 50, locations="uniform")
  assert loc.min() >= 0 and loc.max() <= 1 and loc.std() > 0.25
  with pytest.raises(ValueError, match="'uniform' or 'local'"):
    msda._inputs(1, 50, locations="gaussian")
