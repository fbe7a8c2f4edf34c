"""Networks built from architecture descriptions."""

from nas.models.builder import MobileNetV3Net, build, resolve_blocks
from nas.models.cost import Cost, arch_params, cost, count_params

__all__ = ["Cost", "MobileNetV3Net", "arch_params", "build", "cost", "count_params", "resolve_blocks"]
