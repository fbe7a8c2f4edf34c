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
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self.criterion(logits, y)
        self.train_acc.update(logits.detach(), y)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train_acc", self.train_acc.compute())
        self.train_acc.reset()
        loss = self.trainer.callback_metrics.get("train_loss")
        if loss is not None and not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss.item()} after epoch {self.current_epoch}")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.model(x)
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
