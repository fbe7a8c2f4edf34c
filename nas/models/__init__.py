"""Networks built from architecture descriptions."""

from nas.models.builder import MobileNetV3Net, build, resolve_blocks
from nas.models.cost import Cost, cost, count_params

__all__ = ["Cost", "MobileNetV3Net", "build", "cost", "count_params", "resolve_blocks"]
