"""The LightningModule every trial, ``nas.train`` and the retraining use."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from nas.models import build
from nas.space import Arch, decode

OptimizerFactory = Callable[[Iterable[dict]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying BN scales and biases hurts small nets."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial cannot continue."""


class ClassifierModule(pl.LightningModule):
    def __init__(
        self,
        arch: str | Arch,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        weight_decay: float = 5e-5,
        label_smoothing: float = 0.0,
        dropout: float = 0.2,
        bn_momentum: float = 0.1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        arch_text = arch.encode() if isinstance(arch, Arch) else arch
        self.save_hyperparameters(
            {
                "arch": arch_text,
                "num_classes": num_classes,
                "weight_decay": weight_decay,
                "label_smoothing": label_smoothing,
                "dropout": dropout,
                "bn_momentum": bn_momentum,
            }
        )
        self.arch = decode(arch_text)
        self.model = build(self.arch, num_classes, dropout=dropout, bn_momentum=bn_momentum)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay = weight_decay
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._all_finite: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc.update(logits.detach(), y)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        # Accumulated on the device: one host sync per epoch, not per step.
        finite = torch.isfinite(loss.detach())
        self._all_finite = finite if self._all_finite is None else self._all_finite & finite
        return loss

    def on_train_epoch_start(self) -> None:
        self._all_finite: torch.Tensor | None = None

    def on_validation_epoch_start(self) -> None:
        # Validation runs inside the training epoch: stop before evaluating a diverged network.
        if self._all_finite is not None and not bool(self._all_finite):
            raise NonFiniteLossError(f"training loss became NaN or infinite in epoch {self.current_epoch}")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", self.criterion(logits, y), on_step=False, on_epoch=True)
        metric.update(logits, y)
        self.log(f"{prefix}_acc", metric, on_step=False, on_epoch=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(param_groups(self.model, self.weight_decay))
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
