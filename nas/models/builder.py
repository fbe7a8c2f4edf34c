"""Turn an :class:`~nas.space.Arch` into a ``torch.nn.Module``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from nas.models.blocks import ACTIVATION_LAYERS, InvertedResidual, batch_norm, make_divisible
from nas.space.arch import Arch


@dataclass(frozen=True)
class ResolvedBlock:
    """A block with its actual (width-scaled, rounded) channel counts: what the layers get."""

    in_channels: int
    expanded_channels: int
    out_channels: int
    kernel: int
    stride: int
    activation: str
    se: bool


def resolve_blocks(arch: Arch) -> list[ResolvedBlock]:
    """Apply the width multiplier the way torchvision does (base channels x width, rounded to 8)."""
    w = arch.width
    base_in = arch.stem_channels
    resolved = []
    for b in arch.blocks:
        resolved.append(
            ResolvedBlock(
                in_channels=make_divisible(base_in * w),
                expanded_channels=make_divisible(base_in * b.expansion * w),
                out_channels=make_divisible(b.out_channels * w),
                kernel=b.kernel,
                stride=b.stride,
                activation=b.activation,
                se=b.se,
            )
        )
        base_in = b.out_channels
    return resolved


class MobileNetV3Net(nn.Module):
    """Stem, inverted-residual blocks, 1x1 head conv, global pooling, classifier (no BN)."""

    def __init__(self, arch: Arch, num_classes: int, dropout: float = 0.2, bn_momentum: float = 0.01) -> None:
        super().__init__()
        norm = batch_norm(bn_momentum)
        w = arch.width
        blocks = resolve_blocks(arch)
        stem_out = make_divisible(arch.stem_channels * w)
        head_out = make_divisible(arch.head_channels * w)
        hidden = make_divisible(arch.classifier_channels * w)
        layers: list[nn.Module] = [
            Conv2dNormActivation(
                3,
                stem_out,
                kernel_size=3,
                stride=arch.stem_stride,
                norm_layer=norm,
                activation_layer=ACTIVATION_LAYERS[arch.stem_activation],
            )
        ]
        layers += [
            InvertedResidual(
                b.in_channels, b.expanded_channels, b.out_channels, b.kernel, b.stride, b.activation, b.se, norm
            )
            for b in blocks
        ]
        layers.append(
            Conv2dNormActivation(
                blocks[-1].out_channels,
                head_out,
                kernel_size=1,
                norm_layer=norm,
                activation_layer=ACTIVATION_LAYERS[arch.head_activation],
            )
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(head_out, hidden),
            ACTIVATION_LAYERS[arch.head_activation](inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(hidden, num_classes),
        )
        self.arch = arch
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build(arch: Arch, num_classes: int, dropout: float = 0.2, bn_momentum: float = 0.01) -> nn.Module:
    """Build the network described by ``arch`` (MobileNetV3 semantics, torchvision layer names)."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return MobileNetV3Net(arch, num_classes, dropout=dropout, bn_momentum=bn_momentum)
