"""The LightningModule every trial, ``nas.train`` and the retraining use."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from nas.errors import NasError
from nas.models import build
from nas.space import Arch, decode
from nas.train.graphed_step import GraphedTrainStep, ddp_refusal, graph_ready_optimizer

OptimizerFactory = Callable[[Iterable[dict]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying BN scales and biases hurts small nets."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


FINITE_CHECK_STEPS = 50  # a diverged epoch stops within this many steps: one host sync each time


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
        cuda_graph: bool = False,
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
        # Metric objects: exact over every image when DDP ranks evaluate shards of different sizes.
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # Training loss sum, correct predictions, non-finite losses: summed on the device in place
        # (a captured graph keeps their address), read once per epoch. Not a buffer: a module cast
        # (train.precision=bf16-true) must not turn the counts into bf16, exact only up to 256.
        self._epoch_sums = torch.zeros(3)
        self._epoch_steps = 0
        self._epoch_images = 0
        # A captured step owns the optimizer and schedule, so Lightning must not step them itself.
        self.cuda_graph = cuda_graph
        self.automatic_optimization = not cuda_graph
        self._graphed: GraphedTrainStep | None = None
        self.graph_captured = False  # whether the last fit really replayed a CUDA graph (not on a CPU)
        self.graph_fallback: str | None = None  # why the last fit trained eagerly although asked to capture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))

    def _accumulate(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        correct = (logits.argmax(1) == y).sum()
        self._epoch_sums.add_(torch.stack([loss.float(), correct.float(), (~torch.isfinite(loss)).float()]))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if self.cuda_graph:
            self._graphed_step(x, y)
            loss = None
        else:
            logits = self(x)
            loss = self.criterion(logits, y)
            self._accumulate(loss.detach(), logits.detach(), y)
        self._epoch_steps += 1
        self._epoch_images += len(y)
        last = batch_idx + 1 >= self.trainer.num_training_batches
        # At the epoch's last step (before anything validates or is logged), and every FINITE_CHECK_STEPS steps
        # (a graphed epoch would keep stepping on NaN). Here, inside the step, every DDP rank reaches the check's
        # collective at the same point: an epoch-end hook runs after callbacks that may sync metrics on rank 0 only.
        if last or self._epoch_steps % FINITE_CHECK_STEPS == 0:
            self._raise_if_nonfinite()
        if last:
            # Logged once, at the epoch's last batch, so callbacks see it in on_train_epoch_end.
            sums = self._epoch_sums
            # sync_dist: under DDP the epoch's figure is the mean over ranks (one reduction per epoch).
            self.log("train_loss", sums[0] / self._epoch_steps, on_step=False, on_epoch=True, sync_dist=True)
            self.log("train_acc", sums[1] / self._epoch_images, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _train_step_body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Forward, backward and update without a host sync: the part a CUDA graph captures."""
        optimizer = self._graphed.optimizer
        optimizer.zero_grad(set_to_none=True)
        logits = self(x)
        loss = self.criterion(logits, y)
        loss.backward()
        optimizer.step()
        self._accumulate(loss.detach(), logits.detach(), y)

    def _graphed_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.trainer.world_size > 1:  # however the processes were started (the config check sees most)
            raise NasError(ddp_refusal(self.trainer.world_size))
        lightning_optimizer = self.optimizers()
        if self._graphed is None:
            self._graphed = GraphedTrainStep(self._train_step_body, lightning_optimizer.optimizer)
        # Lightning counts optimizer steps (global_step) around its own step(); a replay bypasses it.
        lightning_optimizer._on_before_step()
        self._graphed(x, y)
        lightning_optimizer._on_after_step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_train_epoch_start(self) -> None:
        if self._epoch_sums.device != self.device:
            self._epoch_sums = torch.zeros(3, device=self.device)
        self._epoch_sums.zero_()
        self._epoch_steps = self._epoch_images = 0

    def on_train_end(self) -> None:
        self.release_graph()

    def release_graph(self) -> None:
        """Free the captured step's graph and static buffers (idempotent; also called when fit raises)."""
        if self._graphed is not None:
            self.graph_captured = self._graphed.captured
            self.graph_fallback = self._graphed.fallback
            self._graphed.release()
            self._graphed = None

    def _raise_if_nonfinite(self) -> None:
        """Under DDP the count is summed over the processes first: every rank checks at the same step, so all
        stop together with the same message (a rank that raised alone would leave the others waiting in the
        next gradient all-reduce until the collective times out)."""
        nonfinite = self._epoch_sums[2]
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            nonfinite = trainer.strategy.reduce(nonfinite.clone(), reduce_op="sum")
        if bool(nonfinite > 0):
            raise NonFiniteLossError(
                f"training loss became NaN or infinite in epoch {self.current_epoch} (by step {self._epoch_steps})"
            )

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str, acc: MulticlassAccuracy, loss: MeanMetric
    ) -> None:
        x, y = batch
        logits = self(x)
        loss.update(self.criterion(logits, y), weight=len(y))
        acc.update(logits, y)
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True)
        self.log(f"{prefix}_acc", acc, on_step=False, on_epoch=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_loss)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_loss)

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(param_groups(self.model, self.weight_decay))
        if self.cuda_graph:
            optimizer = graph_ready_optimizer(optimizer, param_groups(self.model, self.weight_decay))
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
