"""Parameter count and FLOPs of an architecture, via torch's own FLOP counter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from nas.models.builder import build
from nas.space.arch import Arch


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int  # multiply-adds count as 2 FLOPs, as FlopCounterMode reports them

    @property
    def mflops(self) -> float:
        return self.flops / 1e6


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_flops(model: torch.nn.Module, resolution: int, batch_size: int = 1) -> int:
    """FLOPs of one forward pass on the meta device (no memory, no compute)."""
    x = torch.empty(batch_size, 3, resolution, resolution, device="meta")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model.to("meta")(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _meta_model(arch: Arch, num_classes: int) -> torch.nn.Module:
    with torch.device("meta"):
        return build(arch, num_classes)


def arch_params(arch: Arch, num_classes: int = 10) -> int:
    """Parameters only, about 10 ms: for the many draws a latency budget refuses, where counting FLOPs
    (a traced forward pass, about 120 ms) would cost more than the table's latency lookup."""
    return count_params(_meta_model(arch, num_classes))


def cost(arch: Arch, num_classes: int = 10, resolution: int | None = None) -> Cost:
    """Params and FLOPs of ``arch`` at ``resolution`` (default: the architecture's own)."""
    model = _meta_model(arch, num_classes)
    return Cost(params=count_params(model), flops=model_flops(model, resolution or arch.resolution))
