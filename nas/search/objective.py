"""One trial: sample, check the latency constraint, train, report; every outcome recorded with its reason."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
from omegaconf import DictConfig
from optuna_integration import PyTorchLightningPruningCallback

from nas.data import TensorImageDataModule
from nas.data.sources import ImageSplits
from nas.latency.estimator import LatencyEstimator
from nas.models import cost
from nas.search.faults import FaultInjection
from nas.search.hparams import apply_hparams, resolve_hparams, sample_hparams
from nas.search.interrupts import SearchInterrupted
from nas.search.study import is_multi_objective, is_surplus
from nas.space import Arch, Space, decode
from nas.tracking.trials import EpochMetricsToMlflow, StudyTracker
from nas.train.module import NonFiniteLossError
from nas.train.run import make_datamodule, train_arch

CONSTRAINT_KEY = "latency_ms_over_budget"


class TrialFailed(Exception):
    """A trial that could not finish (OOM, NaN loss, unbuildable network): Optuna records FAIL and goes on."""


class SurplusTrial(TrialFailed):
    """Another worker already started the last trial the study needs; this one stops before any work."""


class FitClock(pl.Callback):
    """Wall time of the epochs themselves, so the per-trial fixed cost can be told apart."""

    def __init__(self) -> None:
        self.started = self.seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.started


@dataclass
class TrialOutcome:
    number: int
    state: str  # complete | pruned | infeasible | failed | surplus
    val_acc: float | None
    latency_ms: float | None
    params: int | None
    arch: str | None
    seconds: float
    reason: str | None = None
    reference: str | None = None
    run_id: str | None = None


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return f"out of memory: {str(exc).splitlines()[0][:300]}"
    if isinstance(exc, NonFiniteLossError):
        return f"non-finite loss: {exc}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


@dataclass
class Objective:
    """Callable for ``study.optimize``; holds what is shared across trials (data, latency estimator)."""

    cfg: DictConfig
    space: Space
    splits: ImageSplits
    estimator: LatencyEstimator
    tracker: StudyTracker
    num_classes: int
    outcomes: list[TrialOutcome] = field(default_factory=list)
    _datamodules: dict[int, TensorImageDataModule] = field(default_factory=dict)

    @cached_property
    def hparam_space(self) -> dict[str, dict]:
        """The searched hyperparameters with relative ranges made absolute, once per process."""
        return resolve_hparams(self.cfg.search.hparams, self.cfg)

    def datamodule(self, cfg: DictConfig, resolution: int) -> TensorImageDataModule:
        """One per resolution, built once: decoding and device transfer are not a per-trial cost."""
        if resolution not in self._datamodules:
            self._datamodules[resolution] = make_datamodule(cfg, self.splits, resolution)
        dm = self._datamodules[resolution]
        dm.batch_size = int(cfg.train.batch_size)
        return dm

    def _arch_and_cfg(self, trial: optuna.Trial) -> tuple[Arch, DictConfig, str | None]:
        reference = trial.user_attrs.get("reference")
        if reference is not None:  # an enqueued yardstick: its own arch, the default recipe
            return decode(trial.user_attrs["arch"]), self.cfg, reference
        arch = self.space.sample(trial)
        hparams = sample_hparams(trial, self.hparam_space)
        return arch, apply_hparams(self.cfg, hparams), None

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        t0 = time.perf_counter()
        outcome = TrialOutcome(trial.number, "complete", None, None, None, None, 0.0)
        try:  # everything after ask(): whatever happens, the trial and its run end in a recorded state
            if is_surplus(trial.study, trial.number, int(self.cfg.trials)):
                outcome.state = "surplus"
                trial.set_user_attr("state", "surplus")
                raise SurplusTrial(f"trial {trial.number} is not needed: {self.cfg.trials} trials already started")
            return self._run(trial, outcome, t0)
        except SurplusTrial:
            raise
        except optuna.TrialPruned:
            outcome.state = "pruned"
            trial.set_user_attr("state", "pruned")
            self._end(outcome.run_id, "pruned", "FINISHED")
            raise
        except (SearchInterrupted, KeyboardInterrupt, SystemExit) as exc:
            reason = str(exc) if isinstance(exc, SearchInterrupted) else "interrupted"
            self._failed(trial, outcome, reason, "KILLED")
            # Optuna marks a trial FAIL only for Exception/KeyboardInterrupt; anything else would leave it RUNNING.
            raise KeyboardInterrupt(reason) from exc
        except Exception as exc:
            reason = failure_reason(exc)
            self._failed(trial, outcome, reason, "FAILED")
            raise TrialFailed(reason) from exc
        finally:
            outcome.seconds = time.perf_counter() - t0
            self.outcomes.append(outcome)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _end(self, run_id: str | None, state: str, status: str, reason: str | None = None) -> None:
        if run_id is not None:
            self.tracker.end_trial(run_id, state, status, reason)

    def _failed(self, trial: optuna.Trial, outcome: TrialOutcome, reason: str, status: str) -> None:
        outcome.state, outcome.reason = "failed", reason
        trial.set_user_attr("state", "failed")
        trial.set_user_attr("fail_reason", reason)
        self._end(outcome.run_id, "failed", status, reason)

    def _run(self, trial: optuna.Trial, outcome: TrialOutcome, t0: float) -> float | tuple[float, float]:
        multi = is_multi_objective(self.cfg)
        budget = self.cfg.latency.budget_ms
        hard = budget is not None and self.cfg.search.objective == "accuracy"
        arch, cfg, reference = self._arch_and_cfg(trial)
        text = arch.encode()
        outcome.arch, outcome.reference = text, reference
        trial.set_user_attr("arch", text)
        run_id = self.tracker.start_trial(
            trial.number,
            {"arch": text, **trial.params, **({"reference": reference} if reference else {})},
            {"nas.reference": reference} if reference else {},
        )
        outcome.run_id = run_id
        c = cost(arch, self.num_classes)  # builds the network: an unbuildable one fails here, recorded
        latency = self.estimator.latency_ms(arch)
        outcome.latency_ms, outcome.params = latency, c.params
        trial.set_user_attr("latency_ms", latency)
        trial.set_user_attr("params", c.params)
        trial.set_user_attr("flops", c.flops)
        if budget is not None:
            trial.set_constraint(CONSTRAINT_KEY, latency - float(budget))
        self.tracker.log_metrics(run_id, {"latency_ms": latency, "params": c.params, "flops": c.flops})
        if hard and latency > budget:
            outcome.state = "infeasible"
            trial.set_user_attr("state", "infeasible")
            self.tracker.end_trial(run_id, "infeasible", "FINISHED", f"latency {latency:.4f} ms > {budget} ms")
            return (0.0, latency) if multi else 0.0
        clock = FitClock()
        callbacks: list[Any] = [EpochMetricsToMlflow(self.tracker.client, run_id), clock]
        fault = (self.cfg.search.get("inject_faults") or {}).get(trial.number)
        if fault:
            callbacks.append(FaultInjection(fault))
        if not multi and self.cfg.search.pruner != "none":
            callbacks.append(PyTorchLightningPruningCallback(trial, monitor="val_acc"))
        dm = self.datamodule(cfg, arch.resolution)
        result = train_arch(cfg, arch, dm, callbacks=callbacks)
        outcome.val_acc = result.val_acc
        trial.set_user_attr("state", "complete")
        trial.set_user_attr("val_acc", result.val_acc)
        total = time.perf_counter() - t0
        trial.set_user_attr("time_s", {"total": total, "epochs": clock.seconds})
        self.tracker.log_metrics(
            run_id,
            {
                "val_acc": result.val_acc,
                "val_loss": result.val_loss,
                "time_total_s": total,
                "time_epochs_s": clock.seconds,
                "time_fixed_s": total - clock.seconds,
            },
        )
        self.tracker.end_trial(run_id, "complete", "FINISHED")
        if multi:
            return result.val_acc, latency
        if self.cfg.search.objective == "mnas":
            return result.val_acc * (latency / float(budget)) ** float(self.cfg.search.mnas_exponent)
        return result.val_acc
