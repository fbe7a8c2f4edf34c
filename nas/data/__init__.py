"""Data: torchvision data sets decoded once into tensors, with a seeded validation split."""

from nas.data.datamodule import TensorImageDataModule
from nas.data.sources import DataError, ImageSplits

__all__ = ["DataError", "ImageSplits", "TensorImageDataModule"]
