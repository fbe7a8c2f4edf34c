"""The one way images become a network's input pixels, shared by training, evaluation and ``nas.load`` so that a
deployed model sees the pixels it was trained on: a folder's file decoded to ``data.image_size`` (when set), then
resized to the network's resolution. A bundle's ``preprocess.json`` names the resize and the stored size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

RESIZE = "bilinear-antialias"  # the one resize of the project: training, evaluation and nas.load (preprocess.json)


def resize_images(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Float (N, C, H, W) -> (N, C, R, R), bilinear with antialiasing: a downscale (CIFAR at 24 px, a 256-px
    folder at 224) averages the pixels it drops instead of skipping them, as PIL and torchvision's
    ``resize`` do for a deployed model's input."""
    if x.shape[-2:] == (resolution, resolution):
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


def stored_size(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (C, H, W) at ``size`` x ``size`` (antialiased), as an image folder stores it with ``data.image_size``;
    unchanged without one."""
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    return TF.resize(image, [size, size], antialias=True)


def decode_stored(pil: Image.Image, size: int | None) -> torch.Tensor:
    """An opened image as RGB uint8 (3, H, W) at the stored size. A JPEG more than twice ``size`` is first reduced
    while decoding (``draft``, libjpeg's DCT scaling: several times faster at ImageNet sizes, and other pixels
    than a full decode, which is why ``nas.load`` must decode the same way)."""
    if size is not None:
        pil.draft("RGB", (size, size))
    return stored_size(TF.pil_to_tensor(pil.convert("RGB")), size)
