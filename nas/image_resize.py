"""The one resize of the project, shared by training, evaluation and ``nas.load`` so that a deployed model sees
the pixels it was trained on; a bundle's ``preprocess.json`` names it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

RESIZE = "bilinear-antialias"  # the one resize of the project: training, evaluation and nas.load (preprocess.json)


def resize_images(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Float (N, C, H, W) -> (N, C, R, R), bilinear with antialiasing: a downscale (CIFAR at 24 px, a 256-px
    folder at 224) averages the pixels it drops instead of skipping them, as PIL and torchvision's
    ``resize`` do for a deployed model's input."""
    if x.shape[-2:] == (resolution, resolution):
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
