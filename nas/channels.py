"""Channel rounding shared by the space (timm-width references), the builder and the latency table."""

from __future__ import annotations


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without losing more than 10% (TF/torchvision/timm rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new
