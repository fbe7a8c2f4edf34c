"""Batch-wise augmentation on the tensor's own device.

torchvision's v2 transforms draw one set of random parameters per call, so on
a batch every image would get the same crop; trials on small images need a
different crop and flip per image without a per-image Python loop, which this
does with one gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nas.image_resize import resize_images


def random_crop_flip(x: torch.Tensor, pad: int, hflip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop after zero padding by ``pad`` pixels, and random horizontal flip."""
    n, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
        rows = (oy + torch.arange(h, device=dev)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
        cols = (ox + torch.arange(w, device=dev)).view(n, 1, 1, w).expand(n, c, h, w)
        x = padded.gather(2, rows).gather(3, cols)
    if hflip:
        flip = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


def to_network_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float (N, 3, R, R): grayscale repeated, resized when sizes differ."""
    x = resize_images(x.float().div_(255.0), resolution)
    x = (x - mean) / std
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()
