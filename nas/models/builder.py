"""Turn an :class:`~nas.space.Arch` into a ``torch.nn.Module``."""

from __future__ import annotations

from collections.abc import Callable
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


def make_stem(arch: Arch, norm: Callable[..., nn.Module]) -> nn.Module:
    return Conv2dNormActivation(
        3,
        make_divisible(arch.stem_channels * arch.width),
        kernel_size=3,
        stride=arch.stem_stride,
        norm_layer=norm,
        activation_layer=ACTIVATION_LAYERS[arch.stem_activation],
    )


def make_block(b: ResolvedBlock, norm: Callable[..., nn.Module]) -> InvertedResidual:
    return InvertedResidual(
        b.in_channels, b.expanded_channels, b.out_channels, b.kernel, b.stride, b.activation, b.se, norm
    )


def make_head_conv(arch: Arch, in_channels: int, norm: Callable[..., nn.Module]) -> nn.Module:
    return Conv2dNormActivation(
        in_channels,
        make_divisible(arch.head_channels * arch.width),
        kernel_size=1,
        norm_layer=norm,
        activation_layer=ACTIVATION_LAYERS[arch.head_activation],
    )


def make_classifier(arch: Arch, num_classes: int, dropout: float) -> nn.Sequential:
    head_out = make_divisible(arch.head_channels * arch.width)
    hidden = make_divisible(arch.classifier_channels * arch.width)
    return nn.Sequential(
        nn.Linear(head_out, hidden),
        ACTIVATION_LAYERS[arch.head_activation](inplace=True),
        # Not in place (torchvision's is): ReLU's backward needs its output, which an in-place
        # dropout would overwrite; the tensor is one vector per image, so the copy costs nothing.
        nn.Dropout(p=dropout),
        nn.Linear(hidden, num_classes),
    )


def init_weights(model: nn.Module) -> None:
    """torchvision's MobileNetV3 initialisation."""
    for m in model.modules():
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


class MobileNetV3Net(nn.Module):
    """Stem, inverted-residual blocks, 1x1 head conv, global pooling, classifier (no BN).

    Module names follow torchvision's (``features.N``, ``classifier``), so its weights load.
    """

    def __init__(self, arch: Arch, num_classes: int, dropout: float = 0.2, bn_momentum: float = 0.01) -> None:
        super().__init__()
        norm = batch_norm(bn_momentum)
        blocks = resolve_blocks(arch)
        layers = [make_stem(arch, norm), *(make_block(b, norm) for b in blocks)]
        layers.append(make_head_conv(arch, blocks[-1].out_channels, norm))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = make_classifier(arch, num_classes, dropout)
        self.arch = arch
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build(arch: Arch, num_classes: int, dropout: float = 0.2, bn_momentum: float = 0.01) -> nn.Module:
    """Build the network described by ``arch`` (MobileNetV3 semantics, torchvision layer names)."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return MobileNetV3Net(arch, num_classes, dropout=dropout, bn_momentum=bn_momentum)
