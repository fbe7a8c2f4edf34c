"""Hand-designed networks expressed in the encoding: the yardsticks every search is compared with."""

from __future__ import annotations

from nas.space.arch import Arch, BlockSpec

# (kernel, expansion, out, se, activation, stride) from torchvision's mobilenetv3.py
# (Tables 1 and 2 of the paper). Expansions are expanded/in, e.g. 200/80 = 2.5; 88/24
# is written 3.67, which rounds to the same 88 channels.
_LARGE = (
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
_SMALL = (
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
_REFERENCES = {
    "mobilenet_v3_large": (_LARGE, 960, 1280),
    "mobilenet_v3_small": (_SMALL, 576, 1024),
}
REFERENCE_NAMES = tuple(_REFERENCES)


def reference(
    name: str,
    *,
    resolution: int = 224,
    width: float = 1.0,
    stem_stride: int = 2,
    first_stride2_as_1: int = 0,
) -> Arch:
    """torchvision's MobileNetV3 as an :class:`Arch`.

    The defaults give torchvision's ImageNet network exactly. For small inputs
    (CIFAR, 32x32) CIFAR variants keep more resolution early: pass
    ``stem_stride=1`` and ``first_stride2_as_1=N`` to turn the first N
    stride-2 blocks into stride-1 blocks.
    """
    if name not in _REFERENCES:
        raise ValueError(f"unknown reference architecture {name!r}; known: {', '.join(REFERENCE_NAMES)}")
    rows, head, fc = _REFERENCES[name]
    blocks = []
    to_relax = first_stride2_as_1
    for kernel, exp, out, se, act, stride in rows:
        if stride == 2 and to_relax > 0:
            stride, to_relax = 1, to_relax - 1
        blocks.append(BlockSpec(kernel=kernel, expansion=exp, out_channels=out, stride=stride, activation=act, se=se))
    return Arch(
        resolution=resolution,
        width=width,
        stem_channels=16,
        stem_stride=stem_stride,
        stem_activation="hswish",
        blocks=tuple(blocks),
        head_channels=head,
        head_activation="hswish",
        classifier_channels=fc,
        source=f"reference:{name}",
    )


def arch_from_text(text: str, image_size: int) -> Arch:
    """An ``arch=`` argument: an encoded string, or ``reference:NAME`` adapted to the data's image size.

    Small images (<= 64 px) get the CIFAR adaptation (stride-1 stem and first
    stride-2 block, at least 32 px input); larger ones torchvision's layout.
    """
    from nas.space.arch import decode

    text = str(text).strip()
    if not text.startswith("reference:"):
        return decode(text)
    name = text.removeprefix("reference:")
    if name not in _REFERENCES:
        from nas.space.arch import ArchFormatError

        raise ArchFormatError(f"unknown reference architecture {name!r}; known: {', '.join(REFERENCE_NAMES)}")
    if image_size <= 64:
        return reference(name, resolution=max(32, image_size), stem_stride=1, first_stride2_as_1=1)
    return reference(name, resolution=image_size)
