"""Batch-wise augmentation on the tensor's own device.

torchvision's v2 transforms draw one set of random parameters per call, so on
a batch every image would get the same crop; trials on small images need a
different crop and flip per image without a per-image Python loop, which this
does with one gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from nas.image_resize import resize_images

SMALL_IMAGE_MAX = 64  # augment=auto: pad-crop up to this side (CIFAR-style), random-resized-crop above (ImageNet)


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


def sample_crop_boxes(
    n: int,
    h: int,
    w: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    tries: int = 10,
) -> torch.Tensor:
    """(n, 4) boxes ``x1, y1, x2, y2``: torchvision's ``RandomResizedCrop.get_params`` for a batch. An area
    fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, the first of ``tries`` that fits the
    image; where none fits, the largest centred crop within ``ratio``."""

    def uniform(low: float, high: float, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, device=device).uniform_(low, high, generator=generator)

    area = uniform(scale[0], scale[1], (n, tries)) * (h * w)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries)))
    cw, ch = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (cw <= w) & (ch <= h)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    in_ratio = w / h
    fw, fh = (w, w / min(ratio)) if in_ratio < min(ratio) else (h * max(ratio), h) if in_ratio > max(ratio) else (w, h)
    found = fits.any(dim=1)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    x1 = torch.where(found, uniform(0, 1, (n,)) * (w - cw), (w - cw) / 2)
    y1 = torch.where(found, uniform(0, 1, (n,)) * (h - ch), (h - ch) / 2)
    return torch.stack([x1, y1, x1 + cw, y1 + ch], dim=1)


def random_resized_crop(
    x: torch.Tensor,
    resolution: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image random-resized-crop to ``resolution`` in one call: torchvision's ``roi_align`` crops every
    image's own box and resizes it, averaging all the pixels a bin covers (so a large crop is antialiased).
    uint8 (N, C, H, W) -> float (N, C, R, R) on the same 0-255 scale."""
    n, _, h, w = x.shape
    boxes = sample_crop_boxes(n, h, w, scale, ratio, generator, x.device)
    index = torch.arange(n, device=x.device, dtype=boxes.dtype).unsqueeze(1)
    return roi_align(x.float(), torch.cat([index, boxes], dim=1), resolution, sampling_ratio=-1, aligned=True)


def to_network_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, C, H, W) (or float on its 0-255 scale) -> normalised float (N, 3, R, R): grayscale repeated,
    resized when sizes differ."""
    x = resize_images(x.float().div_(255.0), resolution)
    x = (x - mean) / std
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()
