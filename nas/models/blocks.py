"""MobileNetV3 building blocks, assembled from torchvision's ops."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

ACTIVATION_LAYERS: dict[str, Callable[..., nn.Module]] = {"relu": nn.ReLU, "hswish": nn.Hardswish}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without losing more than 10% (TF/torchvision rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (kxk) -> SE -> linear project (1x1), residual when shapes allow.

    Mirrors torchvision's MobileNetV3 block, so the reference networks have
    exactly torchvision's layers and parameters.
    """

    def __init__(
        self,
        in_channels: int,
        expanded_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        activation: str,
        se: bool,
        norm_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        act = ACTIVATION_LAYERS[activation]
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expanded_channels != in_channels:
            layers.append(
                Conv2dNormActivation(
                    in_channels, expanded_channels, kernel_size=1, norm_layer=norm_layer, activation_layer=act
                )
            )
        layers.append(
            Conv2dNormActivation(
                expanded_channels,
                expanded_channels,
                kernel_size=kernel,
                stride=stride,
                groups=expanded_channels,
                norm_layer=norm_layer,
                activation_layer=act,
            )
        )
        if se:
            squeeze = make_divisible(expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(expanded_channels, squeeze, scale_activation=nn.Hardsigmoid))
        layers.append(
            Conv2dNormActivation(
                expanded_channels, out_channels, kernel_size=1, norm_layer=norm_layer, activation_layer=None
            )
        )
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = out + x
        return out


def batch_norm(momentum: float) -> Callable[..., nn.Module]:
    """torchvision's MobileNetV3 uses eps=1e-3; momentum is left to the caller (short trials want 0.1)."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=momentum)
