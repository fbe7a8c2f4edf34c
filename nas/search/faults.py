"""Fault injection for testing how a search survives failing trials (``search.inject_faults={N: kind}``).

Kinds: ``oom`` raises a CUDA out-of-memory error at the first training step;
``nonfinite`` poisons a weight so the loss genuinely becomes NaN; ``error`` raises a
plain RuntimeError. Nothing is injected unless the config asks for it.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

KINDS = ("oom", "nonfinite", "error")


class FaultInjection(pl.Callback):
    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
        self.kind = kind

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx != 0:
            return
        if self.kind == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected fault)")
        if self.kind == "nonfinite":
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.ndim > 1).fill_(float("nan"))
        if self.kind == "error":
            raise RuntimeError("injected fault")
