"""The one error type the loader treats specially: an image that exists but cannot be decoded."""


class CorruptImageError(ValueError):
  """An unreadable or corrupt image; the loader skips and counts it unless `data.strict`."""
