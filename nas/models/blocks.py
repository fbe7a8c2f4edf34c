"""MobileNet building blocks, assembled from torchvision's ops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

from nas.channels import make_divisible

ACTIVATION_LAYERS: dict[str, Callable[..., nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish}


@dataclass(frozen=True)
class ResolvedBlock:
    """A block with its actual (width-scaled, rounded) channel counts: the one config a block takes."""

    in_channels: int
    expanded_channels: int
    out_channels: int
    kernel: int
    stride: int
    activation: str
    se: bool
    kind: str = "ir"


def squeeze_excitation(channels: int) -> SqueezeExcitation:
    """MobileNetV3's SE: squeeze to a quarter (rounded to 8), ReLU, hard-sigmoid gate (torchvision and timm
    agree on the rounding because block channels are multiples of 8)."""
    return SqueezeExcitation(channels, make_divisible(channels // 4, 8), scale_activation=nn.Hardsigmoid)


def depthwise(
    channels: int, kernel: int, stride: int, act: Callable[..., nn.Module], se: bool, norm: Callable[..., nn.Module]
) -> list[nn.Module]:
    """The kxk depthwise conv (BN, activation) and its optional SE: the middle of every MobileNet block."""
    conv = Conv2dNormActivation(
        channels, channels, kernel_size=kernel, stride=stride, groups=channels, norm_layer=norm, activation_layer=act
    )
    return [conv, squeeze_excitation(channels)] if se else [conv]


def pointwise(
    in_channels: int, out_channels: int, act: Callable[..., nn.Module] | None, norm: Callable[..., nn.Module]
) -> nn.Module:
    return Conv2dNormActivation(in_channels, out_channels, kernel_size=1, norm_layer=norm, activation_layer=act)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (kxk) -> SE -> linear project (1x1), residual when shapes allow.

    Mirrors torchvision's MobileNetV3 block, so the reference networks have
    exactly torchvision's layers and parameters.
    """

    def __init__(self, cfg: ResolvedBlock, norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        act = ACTIVATION_LAYERS[cfg.activation]
        self.use_res_connect = cfg.stride == 1 and cfg.in_channels == cfg.out_channels
        layers: list[nn.Module] = []
        if cfg.expanded_channels != cfg.in_channels:
            layers.append(pointwise(cfg.in_channels, cfg.expanded_channels, act, norm_layer))
        layers.extend(depthwise(cfg.expanded_channels, cfg.kernel, cfg.stride, act, cfg.se, norm_layer))
        layers.append(pointwise(cfg.expanded_channels, cfg.out_channels, None, norm_layer))  # linear bottleneck
        self.block = nn.Sequential(*layers)
        self.out_channels = cfg.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = out + x
        return out


class DepthwiseSeparable(nn.Module):
    """MobileNetV1's block: depthwise (kxk) -> optional SE -> pointwise (1x1) with its activation; no
    residual. The layout (``block.N``) follows :class:`InvertedResidual`'s, so state dicts read alike."""

    def __init__(self, cfg: ResolvedBlock, norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        act = ACTIVATION_LAYERS[cfg.activation]
        layers = depthwise(cfg.in_channels, cfg.kernel, cfg.stride, act, cfg.se, norm_layer)
        layers.append(pointwise(cfg.in_channels, cfg.out_channels, act, norm_layer))
        self.block = nn.Sequential(*layers)
        self.out_channels = cfg.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def batch_norm(momentum: float) -> Callable[..., nn.Module]:
    """torchvision's MobileNetV3 uses eps=1e-3; momentum is left to the caller (short trials want 0.1)."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=momentum)
