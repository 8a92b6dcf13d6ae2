"""Input pipeline: sources (TFDS coco, COCO folders, generated shapes), DETR transforms,
fixed-shape batches (batching.py documents the batch dict), resumable loaders."""
from ddetr_jax.data.batching import DEVICE_KEYS, HOST_KEYS
from ddetr_jax.data.errors import CorruptImageError
from ddetr_jax.data.loader import (EvalBatches, TrainIterator, check_image_files, make_eval_batches,
                                   make_train_iterator)
from ddetr_jax.data.sources import (Categories, build_source, categories, category_names,
                                    coco_ground_truth)

__all__ = [
    "DEVICE_KEYS", "HOST_KEYS", "CorruptImageError", "EvalBatches", "TrainIterator",
    "check_image_files",
    "make_eval_batches", "make_train_iterator", "Categories", "build_source", "categories",
    "category_names", "coco_ground_truth",
]
