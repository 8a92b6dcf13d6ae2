"""The padding benchmark's policies: rect buckets never pad more than square ones, and the
official batch-max padding never more than either (it has no buckets)."""
import pytest

from benchmarks import padding


@pytest.mark.parametrize("batch_size,landscape", [(2, 1.0), (4, 0.5)])
def test_padding_policies_are_ordered(batch_size, landscape):
  table = padding.padding_table(200, batch_size, landscape, seed=1)
  (square, square_shapes), (rect, rect_shapes), (official, _) = (
      table["square"], table["rect"], table["official"])
  assert 1.0 <= official <= rect < square
  assert square_shapes <= len(padding.deformable_detr.get_config().data.buckets)
  assert rect_shapes > square_shapes  # the price of rect buckets: more batch shapes


def test_train_size_follows_the_official_resize():
  data = padding.deformable_detr.get_config().data
  rng = padding.np.random.default_rng(0)
  for _ in range(200):
    h, w = padding._train_size(rng, 480, 640, data)  # pylint: disable=protected-access
    assert min(h, w) <= max(data.train_scales) and max(h, w) <= data.train_max_size
    # Crops are at most 600/384 = 1.56 long for short, so the 1333 cap never lowers the scale.
    assert min(h, w) >= min(data.train_scales)
