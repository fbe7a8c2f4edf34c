"""Data: torchvision data sets and image folders, decoded once into tensors or streamed from their files,
with a seeded validation split."""

from nas.data.datamodule import TensorImageDataModule
from nas.data.sources import DataError, ImageSplits

__all__ = ["DataError", "ImageSplits", "TensorImageDataModule"]
