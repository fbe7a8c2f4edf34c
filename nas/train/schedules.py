"""Learning-rate schedules stepped per optimiser step, built from torch's own schedulers."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR


def _warmup_steps(warmup: int | float, total_steps: int) -> int:
    steps = int(warmup * total_steps) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    return min(max(steps, 0), max(total_steps - 1, 0))


def cosine(optimizer: Optimizer, total_steps: int, warmup: int | float = 0.05, min_lr: float = 0.0) -> LRScheduler:
    """Linear warm-up (a fraction of all steps, or a step count), then cosine decay to ``min_lr``."""
    warm = _warmup_steps(warmup, total_steps)
    decay = CosineAnnealingLR(optimizer, T_max=max(total_steps - warm, 1), eta_min=min_lr)
    if warm == 0:
        return decay
    ramp = LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warm)
    return SequentialLR(optimizer, [ramp, decay], milestones=[warm])


def one_cycle(
    optimizer: Optimizer, total_steps: int, warmup: int | float = 0.25, cycle_momentum: bool = True
) -> LRScheduler:
    """Smith's one-cycle policy peaking at the optimiser's configured learning rate; with ``cycle_momentum``
    SGD's momentum (AdamW's beta1) moves against the rate, as in torch's OneCycleLR."""
    pct = _warmup_steps(warmup, total_steps) / max(total_steps, 1)
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=max(total_steps, 1),
        pct_start=max(pct, 1e-3),
        cycle_momentum=cycle_momentum,
    )


def constant(optimizer: Optimizer, total_steps: int) -> LRScheduler:
    return LinearLR(optimizer, start_factor=1.0, end_factor=1.0, total_iters=1)
