"""The one error type the loader treats specially: an image that exists but cannot be decoded."""
from ddetr_jax import errors


class CorruptImageError(errors.InvalidInputError):
  """An unreadable or corrupt image; the loader skips and counts it unless `data.strict` (then
  the entry points report it as a user error, naming the file)."""
