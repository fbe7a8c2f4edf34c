"""Hand-designed networks expressed in the encoding: the yardsticks every search is compared with.

Each network is data (a :class:`ReferenceNet`), decoded into an :class:`Arch` by one function.
Names follow timm. Two width conventions exist for "MobileNetV3 0.75":

- torchvision scales every layer, the classifier's hidden layer included, and computes expanded
  channels from the *unrounded* base channels: that is ``reference(name, width=0.75)`` (``w0.75``);
- timm and the paper round each stage's channels first, expand those, and keep the classifier's
  1280/1024 unscaled: :func:`_timm_width` writes that network at ``w1`` with the rounded channel
  counts, since expanding rounded channels is exactly what a width-1 network does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nas.channels import make_divisible
from nas.space.arch import Arch, ArchFormatError, BlockSpec, decode

# (kernel, expansion, out, se, activation, stride) from torchvision's mobilenetv3.py
# (Tables 1 and 2 of the paper). Expansions are expanded/in, e.g. 200/80 = 2.5; 88/24
# is written 3.67, which rounds to the same 88 channels.
Row = tuple[int, float, int, bool, str, int]
_LARGE: tuple[Row, ...] = (
    (3, 1, 16, False, "relu", 1),
    (3, 4, 24, False, "relu", 2),
    (3, 3, 24, False, "relu", 1),
    (5, 3, 40, True, "relu", 2),
    (5, 3, 40, True, "relu", 1),
    (5, 3, 40, True, "relu", 1),
    (3, 6, 80, False, "hswish", 2),
    (3, 2.5, 80, False, "hswish", 1),
    (3, 2.3, 80, False, "hswish", 1),
    (3, 2.3, 80, False, "hswish", 1),
    (3, 6, 112, True, "hswish", 1),
    (3, 6, 112, True, "hswish", 1),
    (5, 6, 160, True, "hswish", 2),
    (5, 6, 160, True, "hswish", 1),
    (5, 6, 160, True, "hswish", 1),
)
_SMALL: tuple[Row, ...] = (
    (3, 1, 16, True, "relu", 2),
    (3, 4.5, 24, False, "relu", 2),
    (3, 3.67, 24, False, "relu", 1),
    (5, 4, 40, True, "hswish", 2),
    (5, 6, 40, True, "hswish", 1),
    (5, 6, 40, True, "hswish", 1),
    (5, 3, 48, True, "hswish", 1),
    (5, 3, 48, True, "hswish", 1),
    (5, 6, 96, True, "hswish", 2),
    (5, 6, 96, True, "hswish", 1),
    (5, 6, 96, True, "hswish", 1),
)


def _stages(*stages: tuple[float, int, int, int], kernel: int = 3, activation: str = "relu6") -> tuple[Row, ...]:
    """MobileNetV2's (t, c, n, s) table: n blocks of expansion t and c channels, the first with stride s."""
    return tuple((kernel, t, c, False, activation, s if i == 0 else 1) for t, c, n, s in stages for i in range(n))


@dataclass(frozen=True)
class ReferenceNet:
    """A hand-designed network as data: blocks, stem, head conv (or none) and hidden classifier layer
    (or none)."""

    rows: tuple[Row, ...]
    stem_channels: int = 16
    stem_activation: str = "hswish"
    head_channels: int | None = None
    head_activation: str | None = "hswish"
    classifier_channels: int | None = None
    block_kind: str = "ir"


def _timm_width(net: ReferenceNet, multiplier: float) -> ReferenceNet:
    """timm's ``channel_multiplier``: stage channels and head conv rounded, classifier kept, stem kept
    below 0.75 (timm's ``fix_stem``)."""
    rows = tuple((k, e, make_divisible(c * multiplier), se, a, s) for k, e, c, se, a, s in net.rows)
    stem = net.stem_channels if multiplier < 0.75 else make_divisible(net.stem_channels * multiplier)
    head = make_divisible(net.head_channels * multiplier) if net.head_channels else None
    return replace(net, rows=rows, stem_channels=stem, head_channels=head)


def _minimal(net: ReferenceNet) -> ReferenceNet:
    """The paper's minimalistic variant: 3x3 kernels, no SE, ReLU everywhere."""
    rows = tuple((3, e, c, False, "relu", s) for _, e, c, _, _, s in net.rows)
    return replace(net, rows=rows, stem_activation="relu", head_activation="relu")


_V3_LARGE = ReferenceNet(_LARGE, head_channels=960, classifier_channels=1280)
_V3_SMALL = ReferenceNet(_SMALL, head_channels=576, classifier_channels=1024)
_V1_ROWS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2), (1024, 1))

REFERENCES: dict[str, ReferenceNet] = {
    "mobilenet_v1": ReferenceNet(
        tuple((3, 1, c, False, "relu6", s) for c, s in _V1_ROWS),
        stem_channels=32, stem_activation="relu6", block_kind="ds",
    ),
    "mobilenet_v2": ReferenceNet(
        _stages((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)),
        stem_channels=32, stem_activation="relu6", head_channels=1280, head_activation="relu6",
    ),
    "mobilenet_v3_large": _V3_LARGE,
    "mobilenet_v3_small": _V3_SMALL,
    "mobilenet_v3_large_075": _timm_width(_V3_LARGE, 0.75),
    "mobilenet_v3_small_075": _timm_width(_V3_SMALL, 0.75),
    "mobilenet_v3_small_050": _timm_width(_V3_SMALL, 0.5),
    "mobilenet_v3_large_minimal": _minimal(_V3_LARGE),
    "mobilenet_v3_small_minimal": _minimal(_V3_SMALL),
}  # fmt: skip
REFERENCE_NAMES = tuple(REFERENCES)


def reference(
    name: str,
    *,
    resolution: int = 224,
    width: float = 1.0,
    stem_stride: int = 2,
    first_stride2_as_1: int = 0,
) -> Arch:
    """A hand-designed network as an :class:`Arch`.

    The defaults give the ImageNet network exactly (torchvision's, or timm's where torchvision has
    none). For small inputs (CIFAR, 32x32) CIFAR variants keep more resolution early: pass
    ``stem_stride=1`` and ``first_stride2_as_1=N`` to turn the first N stride-2 blocks into stride-1
    blocks. ``width`` scales the way torchvision does (see the module docstring).
    """
    if name not in REFERENCES:
        raise ValueError(f"unknown reference architecture {name!r}; known: {', '.join(REFERENCE_NAMES)}")
    net = REFERENCES[name]
    blocks = []
    to_relax = first_stride2_as_1
    for kernel, exp, out, se, act, stride in net.rows:
        if stride == 2 and to_relax > 0:
            stride, to_relax = 1, to_relax - 1
        blocks.append(BlockSpec(kernel, exp, out, stride, act, se, kind=net.block_kind))
    return Arch(
        resolution=resolution,
        width=width,
        stem_channels=net.stem_channels,
        stem_stride=stem_stride,
        stem_activation=net.stem_activation,
        blocks=tuple(blocks),
        head_channels=net.head_channels,
        head_activation=net.head_activation if net.head_channels is not None else None,
        classifier_channels=net.classifier_channels,
        source=f"reference:{name}",
    )


def arch_from_text(text: str, image_size: int) -> Arch:
    """An ``arch=`` argument: an encoded string, or ``reference:NAME`` adapted to the data's image size.

    Small images (<= 64 px) get the CIFAR adaptation (stride-1 stem and first
    stride-2 block, at least 32 px input); larger ones the ImageNet layout.
    """
    text = str(text).strip()
    if not text.startswith("reference:"):
        return decode(text)
    name = text.removeprefix("reference:")
    if name not in REFERENCES:
        raise ArchFormatError(f"unknown reference architecture {name!r}; known: {', '.join(REFERENCE_NAMES)}")
    if image_size <= 64:
        return reference(name, resolution=max(32, image_size), stem_stride=1, first_stride2_as_1=1)
    return reference(name, resolution=image_size)
