"""Signs of life from long training: epoch lines a person (or a scheduler's log) can follow.

A retrain of 200 epochs prints every epoch; a search trial prints an epoch line only when it has been silent
for a while, so a 200-trial study's log stays about one line per trial. On a terminal, ``nas.train`` and
``nas.retrain`` show Lightning's own progress bar instead (``train.progress_bar=auto``).
"""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl

SHOWN = ("train_loss", "train_acc", "val_loss", "val_acc")


def human_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_bar(choice: bool | str) -> bool:
    """``auto``: Lightning's bar where a person watches (a terminal), epoch lines where a log is written."""
    return sys.stdout.isatty() if choice == "auto" else bool(choice)


class EpochLines(pl.Callback):
    """``<label> epoch 3/200: train_loss 1.2345  train_acc 0.5432  val_acc 0.5100  (12.3 s/epoch, 40 min left)``
    at the end of an epoch, when ``every_s`` seconds have passed since the last line (0: every epoch)."""

    def __init__(self, label: str, every_s: float = 0.0) -> None:
        self.label = label
        self.every_s = every_s
        self._start = self._last = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Read on every rank: under DDP reading the epoch's metrics is a collective.
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k in SHOWN}
        now = time.monotonic()
        if not trainer.is_global_zero or now - self._last < self.every_s:
            return
        self._last = now
        done, total = trainer.current_epoch + 1, trainer.max_epochs
        per_epoch = (now - self._start) / done
        figures = "  ".join(f"{k} {shown[k]:.4f}" for k in SHOWN if k in shown)
        left = f", {human_duration(per_epoch * (total - done))} left" if total and total > done else ""
        print(f"{self.label}epoch {done}/{total}: {figures}  ({per_epoch:.1f} s/epoch{left})", flush=True)
