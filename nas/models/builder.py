"""Turn an :class:`~nas.space.Arch` into a ``torch.nn.Module``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from nas.channels import make_divisible
from nas.models.blocks import ACTIVATION_LAYERS, DepthwiseSeparable, InvertedResidual, ResolvedBlock, batch_norm
from nas.space.arch import Arch


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
                kind=b.kind,
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


BLOCKS: dict[str, Callable[[ResolvedBlock, Callable[..., nn.Module]], nn.Module]] = {
    "ir": InvertedResidual,
    "ds": DepthwiseSeparable,
}


def make_block(b: ResolvedBlock, norm: Callable[..., nn.Module]) -> nn.Module:
    return BLOCKS[b.kind](b, norm)


def head_out_channels(arch: Arch, in_channels: int) -> int:
    """What the classifier sees: the head conv's channels, or the last block's where there is no head."""
    return in_channels if arch.head_channels is None else make_divisible(arch.head_channels * arch.width)


def make_head_conv(arch: Arch, in_channels: int, norm: Callable[..., nn.Module]) -> nn.Module:
    """The 1x1 conv after the last block; an identity for networks without one (MobileNetV1)."""
    if arch.head_channels is None or arch.head_activation is None:
        return nn.Identity()
    return Conv2dNormActivation(
        in_channels,
        head_out_channels(arch, in_channels),
        kernel_size=1,
        norm_layer=norm,
        activation_layer=ACTIVATION_LAYERS[arch.head_activation],
    )


def make_classifier(arch: Arch, in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Linear layers on the pooled features: one (MobileNetV1/V2, names as torchvision's V2), or a hidden
    layer with the head's activation first (MobileNetV3, names as torchvision's V3)."""
    if arch.classifier_channels is None or arch.head_activation is None:
        return nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_channels, num_classes))
    hidden = make_divisible(arch.classifier_channels * arch.width)
    return nn.Sequential(
        nn.Linear(in_channels, hidden),
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


class MobileNet(nn.Module):
    """Stem, blocks, 1x1 head conv (if any), global pooling, classifier (no BN).

    Module names follow torchvision's MobileNetV3 (``features.N``, ``classifier``), so its weights load.
    A network without a head conv has no ``features`` entry for it.
    """

    def __init__(self, arch: Arch, num_classes: int, dropout: float = 0.2, bn_momentum: float = 0.01) -> None:
        super().__init__()
        norm = batch_norm(bn_momentum)
        blocks = resolve_blocks(arch)
        layers = [make_stem(arch, norm), *(make_block(b, norm) for b in blocks)]
        if arch.head_channels is not None:
            layers.append(make_head_conv(arch, blocks[-1].out_channels, norm))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = make_classifier(arch, head_out_channels(arch, blocks[-1].out_channels), num_classes, dropout)
        self.arch = arch
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# Registered models logged before the rename are pickles that name this class.
MobileNetV3Net = MobileNet


def build(arch: Arch, num_classes: int, dropout: float = 0.2, bn_momentum: float = 0.01) -> nn.Module:
    """Build the network described by ``arch`` (MobileNet semantics, torchvision layer names)."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return MobileNet(arch, num_classes, dropout=dropout, bn_momentum=bn_momentum)
