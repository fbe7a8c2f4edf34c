"""Pruning that compares like with like: enough evidence at an epoch, values on the objective's scale.

Two small pieces around whatever Optuna pruner ``search/pruner`` names:

- :class:`EvidencePruner` lets the configured pruner decide only once ``min_trials`` other
  trials have reported at the same epoch, and never during the first ``warmup_epochs``. Optuna's
  pruners count startup trials among COMPLETE trials, which in a latency-constrained study
  include untrained draws over the budget, and successive halving keeps the first trial at a
  rung and prunes the second one worse than it: one finished network pruned everything after it.
  The wrapper also means TPE learns from every trial: Optuna narrows a sampler to one Hyperband
  bracket only when the study's pruner *is* a ``HyperbandPruner``.
- :class:`ReportToPruner` reports each epoch's validation accuracy converted by the objective
  (MnasNet's objective scales it by a latency factor known before training), and never prunes
  at the last epoch, where stopping saves nothing and would throw the finished result away.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import optuna
from optuna.trial import FrozenTrial, TrialState


class EvidencePruner(optuna.pruners.BasePruner):
    def __init__(self, wrapped: optuna.pruners.BasePruner, min_trials: int, warmup_epochs: int) -> None:
        if min_trials < 0 or warmup_epochs < 0:
            raise ValueError("min_trials and warmup_epochs must be >= 0")
        self.wrapped = wrapped
        self.min_trials = min_trials
        self.warmup_epochs = warmup_epochs

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        # Always asked, so a stateful pruner (successive halving records each rung) keeps its books.
        verdict = self.wrapped.prune(study, trial)
        if not verdict or step < self.warmup_epochs:
            return False
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        reported = sum(
            1
            for t in study.get_trials(deepcopy=False, states=states)
            if t.number != trial.number and step in t.intermediate_values
        )
        return reported >= self.min_trials


class ReportToPruner(pl.Callback):
    """Reports ``val_acc`` after every validation epoch and stops the trial when the pruner says so."""

    def __init__(self, trial: optuna.Trial, to_objective: Callable[[float], float]) -> None:
        self.trial = trial
        self.to_objective = to_objective
        self.last_val_acc: float | None = None
        self.epochs = 0  # epochs reported so far

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "val_acc" not in trainer.callback_metrics:
            return
        epoch = pl_module.current_epoch
        self.last_val_acc = float(trainer.callback_metrics["val_acc"])
        self.epochs = epoch + 1
        self.trial.report(self.to_objective(self.last_val_acc), step=epoch)
        if epoch + 1 < int(trainer.max_epochs or 0) and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")
