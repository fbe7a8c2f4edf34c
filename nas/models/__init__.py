"""Networks built from architecture descriptions."""

from nas.models.builder import MobileNet, build, resolve_blocks
from nas.models.cost import Cost, arch_params, cost, count_params

__all__ = ["Cost", "MobileNet", "arch_params", "build", "cost", "count_params", "resolve_blocks"]
