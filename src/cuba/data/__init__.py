"""Data sets held in memory as uint8 tensors, and the loaders that build them."""

from cuba.data.base import DataError, ImageDataset
from cuba.data.sources import DATASET_NAMES, data_for, load_dataset

__all__ = ["DATASET_NAMES", "DataError", "ImageDataset", "data_for", "load_dataset"]
