"""Flax modules of Deformable DETR; `build_model(config)` builds the detector of a full config."""
import ml_collections

from ddetr_jax import errors
from ddetr_jax.models.deformable_detr import DeformableDETR


def build_model(config: ml_collections.ConfigDict) -> DeformableDETR:
  """Returns `DeformableDETR(**config.model)` for a full config (sections model/data/...)."""
  fields = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  known = set(DeformableDETR.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise errors.InvalidInputError(f"config.model has unknown fields {unknown}; DeformableDETR takes {sorted(known)}")
  return DeformableDETR(**fields)


__all__ = ["DeformableDETR", "build_model"]
