"""Concrete architectures and their versioned text encoding.

An :class:`Arch` describes one network completely (one value per searchable
dimension), independently of how it is built; ``nas.models.build`` turns it
into modules.  Channel counts are *base* counts: the builder scales them by
``width`` and rounds to multiples of 8, as torchvision's MobileNetV3 does, so
the encoding stays short and the width multiplier stays visible.

Encoding (format version 1), segments joined by ``-``, fields by ``_``::

    nas1-r32-w0.75-stem_c16_s1_hs-k3_e1_c16_s1_re-k5_e3_c40_s2_hs_se-head_c960_hs-fc_c1280

Two block kinds: the inverted residual (``k5_e3_c40_s2_hs_se``: MobileNetV2/V3)
and the depthwise-separable block of MobileNetV1 (``ds_k3_c64_s1_r6``: an
activation after the pointwise conv, no residual). The ``head`` (1x1 conv) and
``fc`` (hidden classifier layer) segments are optional: MobileNetV2 has a head
but feeds the classifier directly, MobileNetV1 has neither. Activations:
``re`` ReLU, ``r6`` ReLU6, ``hs`` h-swish. Strings written before these were
added decode to the same networks.

Only letters, digits, ``.``, ``_`` and ``-`` are used, so the string needs no
quoting in a shell or a Hydra override.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nas.errors import NasError

FORMAT_VERSION = 1
ACTIVATIONS = ("relu", "relu6", "hswish")
KERNELS = (3, 5, 7)
STRIDES = (1, 2)
BLOCK_KINDS = ("ir", "ds")  # inverted residual (V2/V3); depthwise separable with pointwise activation (V1)

_ACT_CODE = {"relu": "re", "relu6": "r6", "hswish": "hs"}
_CODE_ACT = {v: k for k, v in _ACT_CODE.items()}


class ArchFormatError(NasError, ValueError):
    """An architecture string that cannot be decoded."""


def _fmt_num(x: float) -> str:
    """Shortest text that parses back to exactly ``x`` (``4`` not ``4.0``)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class BlockSpec:
    """One block. ``ir``: 1x1 expand, kxk depthwise, optional SE, 1x1 linear project, residual when
    shapes allow. ``ds`` (MobileNetV1): kxk depthwise, optional SE, 1x1 pointwise with activation, no
    residual and no expansion."""

    kernel: int
    expansion: float
    out_channels: int
    stride: int
    activation: str
    se: bool
    kind: str = "ir"

    def __post_init__(self) -> None:
        object.__setattr__(self, "expansion", float(self.expansion))
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f"block kind {self.kind!r} not in {BLOCK_KINDS}")
        if self.kind == "ds" and self.expansion != 1:
            raise ValueError(f"a depthwise-separable (ds) block has no expansion; got {self.expansion}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel} not in {KERNELS}")
        if self.expansion < 1:
            raise ValueError(f"expansion {self.expansion} must be >= 1")
        if self.out_channels <= 0:
            raise ValueError(f"out_channels {self.out_channels} must be positive")
        if self.stride not in STRIDES:
            raise ValueError(f"stride {self.stride} not in {STRIDES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {ACTIVATIONS}")

    def encode(self) -> str:
        shape = f"ds_k{self.kernel}" if self.kind == "ds" else f"k{self.kernel}_e{_fmt_num(self.expansion)}"
        token = f"{shape}_c{self.out_channels}_s{self.stride}_{_ACT_CODE[self.activation]}"
        return token + ("_se" if self.se else "")


@dataclass(frozen=True)
class Arch:
    """A complete MobileNet-style network description.

    ``head_channels`` is the 1x1 conv after the last block (None: pool the last block's output, as
    MobileNetV1); ``classifier_channels`` the hidden layer before the class scores (None: a single
    linear layer, as MobileNetV1/V2). A hidden layer needs a head: it takes the head's activation.
    """

    resolution: int
    width: float
    stem_channels: int
    stem_stride: int
    stem_activation: str
    blocks: tuple[BlockSpec, ...]
    head_channels: int | None
    head_activation: str | None
    classifier_channels: int | None
    # Not part of identity: the space a sample came from, for messages only.
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if not self.blocks:
            raise ValueError("an architecture needs at least one block")
        if self.resolution <= 0 or self.width <= 0:
            raise ValueError("resolution and width must be positive")
        for name in ("stem_channels", "head_channels", "classifier_channels"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.stem_stride not in STRIDES:
            raise ValueError(f"stem stride {self.stem_stride} not in {STRIDES}")
        if self.head_channels is None:
            if self.head_activation is not None or self.classifier_channels is not None:
                raise ValueError("without a head conv there is neither a head activation nor a hidden classifier layer")
        elif self.head_activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.head_activation!r} not in {ACTIVATIONS}")
        if self.stem_activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.stem_activation!r} not in {ACTIVATIONS}")

    def encode(self) -> str:
        """The canonical, versioned text form; ``decode(a.encode()) == a``."""
        parts = [
            f"nas{FORMAT_VERSION}",
            f"r{self.resolution}",
            f"w{_fmt_num(self.width)}",
            f"stem_c{self.stem_channels}_s{self.stem_stride}_{_ACT_CODE[self.stem_activation]}",
            *(b.encode() for b in self.blocks),
        ]
        if self.head_channels is not None:
            parts.append(f"head_c{self.head_channels}_{_ACT_CODE[self.head_activation]}")
        if self.classifier_channels is not None:
            parts.append(f"fc_c{self.classifier_channels}")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.encode()


_NUM = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"
_ACT = "(" + "|".join(_CODE_ACT) + ")"
_BLOCK_RE = re.compile(rf"k(\d+)_e{_NUM}_c(\d+)_s(\d+)_{_ACT}(_se)?")
_DS_BLOCK_RE = re.compile(rf"ds_k(\d+)_c(\d+)_s(\d+)_{_ACT}(_se)?")
_STEM_RE = re.compile(rf"stem_c(\d+)_s(\d+)_{_ACT}")
_HEAD_RE = re.compile(rf"head_c(\d+)_{_ACT}")
_FC_RE = re.compile(r"fc_c(\d+)")
_RES_RE = re.compile(r"r(\d+)")
_WIDTH_RE = re.compile(rf"w{_NUM}")

_EXAMPLE = "nas1-r32-w1-stem_c16_s1_hs-k3_e4_c24_s2_re-k5_e6_c40_s1_hs_se-head_c960_hs-fc_c1280"


def _match(pattern: re.Pattern[str], token: str, what: str, text: str) -> re.Match[str]:
    m = pattern.fullmatch(token)
    if m is None:
        raise ArchFormatError(
            f"cannot decode architecture {text!r}: {what} segment {token!r} is malformed (expected e.g. {_EXAMPLE!r})"
        )
    return m


def _check_version(text: str, version: str) -> None:
    if not version.startswith("nas"):
        raise ArchFormatError(
            f"cannot decode architecture {text!r}: it must start with a format version "
            f"such as 'nas{FORMAT_VERSION}-' (e.g. {_EXAMPLE!r})"
        )
    if version != f"nas{FORMAT_VERSION}":
        raise ArchFormatError(
            f"cannot decode architecture {text!r}: format {version!r} is not supported by this "
            f"version of nas (supported: nas{FORMAT_VERSION})"
        )


def _decode_block(token: str, text: str) -> BlockSpec:
    if token.startswith("ds_"):
        m = _match(_DS_BLOCK_RE, token, "block", text)
        return BlockSpec(int(m[1]), 1, int(m[2]), int(m[3]), _CODE_ACT[m[4]], m[5] is not None, kind="ds")
    m = _match(_BLOCK_RE, token, "block", text)
    return BlockSpec(int(m[1]), float(m[2]), int(m[3]), int(m[4]), _CODE_ACT[m[5]], m[6] is not None)


def decode(text: str) -> Arch:
    """Parse an encoded architecture string (any supported format version)."""
    text = text.strip()
    segments = text.split("-")
    _check_version(text, segments[0])
    body = segments[4:]
    fc = _match(_FC_RE, body.pop(), "fc", text) if body and body[-1].startswith("fc") else None
    head = _match(_HEAD_RE, body.pop(), "head", text) if body and body[-1].startswith("head") else None
    if len(segments) < 4 or not body:
        raise ArchFormatError(
            f"cannot decode architecture {text!r}: expected version, resolution, width, stem, "
            f"at least one block, then optional head and fc segments (e.g. {_EXAMPLE!r})"
        )
    res = _match(_RES_RE, segments[1], "resolution", text)
    width = _match(_WIDTH_RE, segments[2], "width", text)
    stem = _match(_STEM_RE, segments[3], "stem", text)
    try:
        return Arch(
            resolution=int(res[1]),
            width=float(width[1]),
            stem_channels=int(stem[1]),
            stem_stride=int(stem[2]),
            stem_activation=_CODE_ACT[stem[3]],
            blocks=tuple(_decode_block(token, text) for token in body),
            head_channels=int(head[1]) if head else None,
            head_activation=_CODE_ACT[head[2]] if head else None,
            classifier_channels=int(fc[1]) if fc else None,
        )
    except ValueError as exc:
        raise ArchFormatError(f"cannot decode architecture {text!r}: {exc}") from None
