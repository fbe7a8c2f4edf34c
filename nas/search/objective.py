"""One trial: sample, check the latency budget, train, report; every outcome recorded with its reason.

A draw over a hard latency budget is not trained and gets no MLflow run (the study's run
summarises such draws); the sampler still learns from it through the recorded constraint.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import optuna
import torch
from lightning.pytorch.callbacks import Timer
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from nas import trial_states
from nas.data import TensorImageDataModule
from nas.data.loading import ImageData
from nas.errors import NasError
from nas.interrupts import Interrupted
from nas.latency.estimator import MODE_FALLBACK_ATTR, LatencyEstimator
from nas.models import arch_params, cost
from nas.objectives import StudyObjective
from nas.search.faults import FaultInjection
from nas.search.hparams import resolve_hparams, sample_hparams
from nas.search.pruning import ReportToPruner
from nas.search.screen import REFUSED_ATTR, BudgetScreen, Draft, Refusals
from nas.search.study import is_surplus, worker_index
from nas.space import Arch, Space, decode
from nas.tracking.trials import EpochMetricsToMlflow, StudyTracker, TrackingError
from nas.train.module import NonFiniteLossError
from nas.train.progress import EpochLines
from nas.train.run import apply_hparams, load_training_data, make_datamodule, train_arch

CONSTRAINT_KEY = "latency_ms_over_budget"


class TrialFailed(Exception):
    """A trial that could not finish (OOM, NaN loss, unbuildable network): Optuna records FAIL and goes on."""


class SurplusTrial(TrialFailed):
    """Another worker already started the last trial the study needs; this one stops before any work."""


@dataclass
class TrialOutcome:
    number: int
    state: str  # complete | pruned | infeasible (over budget) | failed | surplus
    val_acc: float | None
    latency_ms: float | None
    params: int | None
    arch: str | None
    seconds: float
    reason: str | None = None
    reference: str | None = None
    run_id: str | None = None
    epochs: int | None = None  # epochs trained (fewer than train.epochs when pruned)
    refused: Refusals = field(default_factory=Refusals)  # draws over the budget refused before this trial
    latency_fallback: str | None = None  # why its latency was timed eagerly (its CUDA-graph capture failed)


def data_key(cfg: DictConfig) -> str:
    """What a data module is built from, besides the images: a change means building it again."""
    t = cfg.train
    built_from = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "train": [t.accelerator, t.eval_batch_size, t.limit_train_images],
    }
    return json.dumps(built_from, sort_keys=True, default=str)


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, NasError):  # already one clear sentence (a tracking outage, a bad setting)
        return str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return f"out of memory: {str(exc).splitlines()[0][:300]}"
    if isinstance(exc, NonFiniteLossError):
        return f"non-finite loss: {exc}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def free_trial_memory() -> None:
    """Collect the last trial's network, trainer and activations (they sit in reference cycles) and hand
    cached GPU blocks back. Called by the loop once the trial has fully ended: inside the objective a
    failed trial's traceback still holds all of it, and one OOM would then cascade into the next trials."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def from_queue(trial: optuna.Trial) -> bool:
    """Enqueued (a yardstick) or a heartbeat retry: work that must not be lost if this run of it is surplus."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return "fixed_params" in frozen.system_attrs or "failed_trial" in frozen.system_attrs


def give_back(trial: optuna.Trial) -> None:
    """Queued work this trial did not finish (surplus, interrupted) goes back to the queue, so a later run
    trains it; a sampled trial is simply sampled again."""
    if from_queue(trial):
        kept = {k: v for k, v in trial.user_attrs.items() if k in ("reference", "arch")}
        trial.study.enqueue_trial(trial.params, user_attrs=kept, skip_if_exists=False)


@dataclass
class Objective:
    """Callable for ``study.optimize``; holds what is shared across trials (data, latency estimator)."""

    cfg: DictConfig
    space: Space
    splits: ImageData | None  # None once released (reloaded when a run needs it)
    estimator: LatencyEstimator
    tracker: StudyTracker
    num_classes: int
    goal: StudyObjective
    outcomes: list[TrialOutcome] = field(default_factory=list)
    screen: BudgetScreen | None = None  # set by screen_draws(): over-budget draws refused before trials
    _datamodule: TensorImageDataModule | None = None
    _data_key: str | None = None

    @cached_property
    def hparam_space(self) -> dict[str, dict]:
        """The searched hyperparameters with relative ranges made absolute, once per process."""
        return resolve_hparams(self.cfg.search.hparams, self.cfg)

    def datamodule(self, cfg: DictConfig, resolution: int) -> TensorImageDataModule:
        """The one data module of this process, whatever the resolution: images are stored once (on the
        training device) and resized per batch, so a space of three resolutions does not hold three copies.
        Built again only when a setting it was built with changes (a searched ``data.*`` key)."""
        key = data_key(cfg)
        if key != self._data_key:
            self._datamodule = None  # the old copy goes before the new one is made
            if self.splits is None:
                self.splits = load_training_data(self.cfg)
            self._datamodule, self._data_key = make_datamodule(cfg, self.splits, resolution), key
        dm = self._datamodule
        assert dm is not None
        dm.resolution, dm.batch_size, dm.seed = resolution, int(cfg.train.batch_size), int(cfg.seed)
        return dm

    def release_data(self) -> None:
        """Drop this process's images: the main process holds none while its workers train theirs."""
        self.splits, self._datamodule, self._data_key = None, None, None
        free_trial_memory()

    def draw(self, source: Any) -> tuple[Arch, dict[str, Any]]:
        """One candidate from an Optuna trial or the screen's draft: the architecture, then the hyperparameters
        (the same suggestions in the same order either way, so a drafted candidate is what the trial holds)."""
        return self.space.sample(source), sample_hparams(source, self.hparam_space)

    def judge(self, arch: Arch) -> tuple[float, dict[str, Any]]:
        """The latency estimate and what it was made of (predicted and measured, near the budget)."""
        latency = self.estimator.latency_ms(arch)
        return latency, dict(getattr(self.estimator, "details", {}))

    def screen_draws(self, study: optuna.Study) -> None:
        """Put the screen in front of the study's sampler, where a hard budget makes draws worth refusing
        (search.draws_per_trial; 1: every draw a trial)."""
        attempts, limit = int(self.cfg.search.draws_per_trial), int(self.cfg.search.max_draws_over_budget)
        if not self.goal.hard_budget or attempts <= 1:
            return
        seed = int(self.cfg.seed) + 7_919 * worker_index(self.cfg)
        draw = lambda source: self.draw(source)[0]  # noqa: E731
        steady = int(self.cfg.search.startup_trials)
        over = self.goal.is_over_budget
        self.screen = BudgetScreen(study.sampler, draw, self.judge, over, attempts, limit, seed, steady)
        study.sampler = self.screen

    def _arch_and_cfg(self, trial: optuna.Trial) -> tuple[Arch, DictConfig, str | None]:
        reference = trial.user_attrs.get("reference")
        if reference is not None:  # an enqueued yardstick: its own arch, the default recipe
            return decode(trial.user_attrs["arch"]), self.cfg, reference
        arch, hparams = self.draw(trial)
        return arch, apply_hparams(self.cfg, hparams), None

    def _take_draft(self, trial: optuna.Trial, outcome: TrialOutcome) -> Draft | None:
        """The screen's judged candidate for this trial, and the draws it refused on the way (kept on the trial)."""
        draft = self.screen.take(trial.number) if self.screen else None
        if draft is None or draft.arch != outcome.arch:
            return None
        if draft.refused.count:
            outcome.refused = draft.refused
            trial.set_user_attr(REFUSED_ATTR, draft.refused.record())
        return draft

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        t0 = time.perf_counter()
        outcome = TrialOutcome(trial.number, trial_states.COMPLETE, None, None, None, None, 0.0)
        try:  # everything after ask(): whatever happens, the trial and its run end in a recorded state
            return self._run(trial, outcome, t0)
        except SurplusTrial:
            raise
        except optuna.TrialPruned:
            outcome.state = trial_states.PRUNED
            trial.set_user_attr("state", trial_states.PRUNED)
            if outcome.val_acc is not None:  # the last epoch's accuracy, for charts (never ranked)
                trial.set_user_attr("val_acc", outcome.val_acc)
            trial.set_user_attr("epochs", outcome.epochs)
            self._close_run(trial, outcome, trial_states.PRUNED, {})
            raise
        except (Interrupted, KeyboardInterrupt, SystemExit) as exc:
            reason = str(exc) if isinstance(exc, Interrupted) else "interrupted"
            self._failed(trial, outcome, reason, "KILLED")
            give_back(trial)  # an interrupted yardstick or retry trains on the rerun
            # Optuna marks a trial FAIL only for Exception/KeyboardInterrupt; anything else would leave it RUNNING.
            raise KeyboardInterrupt(reason) from exc
        except Exception as exc:
            reason = failure_reason(exc)
            # A tracking outage is recorded in Optuna only: asking MLflow again would fail the same way.
            self._failed(trial, outcome, reason, "FAILED", record=not isinstance(exc, TrackingError))
            raise TrialFailed(reason) from exc
        finally:
            outcome.seconds = time.perf_counter() - t0
            self.outcomes.append(outcome)

    def _failed(
        self, trial: optuna.Trial, outcome: TrialOutcome, reason: str, status: str, record: bool = True
    ) -> None:
        """The trial's reason goes to Optuna first (the source of truth), then to its MLflow run."""
        outcome.state, outcome.reason = trial_states.FAILED, reason
        trial.set_user_attr("state", trial_states.FAILED)
        trial.set_user_attr("fail_reason", reason)
        if not record:
            return
        try:
            if outcome.run_id is None:  # failed before training (e.g. unbuildable): a run still records why
                outcome.run_id = self._start_run(trial, outcome)
            self.tracker.end_trial(outcome.run_id, trial_states.FAILED, status, reason)
        except TrackingError as exc:
            outcome.reason = f"{reason}; {exc}"
            trial.set_user_attr("fail_reason", outcome.reason)

    def _close_run(self, trial: optuna.Trial, outcome: TrialOutcome, state: str, metrics: dict[str, float]) -> None:
        """The trained trial's last metrics and state; an MLflow outage now costs the run, never the result."""
        if outcome.run_id is None:
            return
        try:
            self.tracker.log_metrics(outcome.run_id, metrics)
            self.tracker.end_trial(outcome.run_id, state, "FINISHED")
        except TrackingError as exc:
            outcome.reason = f"trained and kept, but not recorded in MLflow: {exc}"
            trial.set_user_attr("tracking_error", str(exc))

    def _start_run(self, trial: optuna.Trial, outcome: TrialOutcome) -> str:
        reference = outcome.reference
        params = {**({"arch": outcome.arch} if outcome.arch else {}), **trial.params}
        tags = {}
        if reference:
            params["reference"] = reference
            tags["nas.reference"] = reference
        if outcome.latency_fallback:
            tags["nas.latency_mode"] = f"eager fallback: {outcome.latency_fallback}"
        return self.tracker.start_trial(trial.number, params, tags)

    def _measure(self, trial: optuna.Trial, outcome: TrialOutcome, arch: Arch, draft: Draft | None) -> float:
        """Latency and params, known before any training (the constraint goes to the sampler); a drafted
        candidate was judged by the screen already."""
        params = arch_params(arch, self.num_classes)  # builds the network: an unbuildable one fails here
        latency, details = (draft.latency_ms, draft.details) if draft else self.judge(arch)
        outcome.latency_ms, outcome.params = latency, params
        trial.set_user_attr("latency_ms", latency)
        for key, value in details.items():  # predicted and measured near the budget, the mode it was timed in
            trial.set_user_attr(key, value)
        outcome.latency_fallback = details.get(MODE_FALLBACK_ATTR)
        trial.set_user_attr("params", params)
        if self.goal.hard_budget:
            trial.set_constraint(CONSTRAINT_KEY, latency - float(self.goal.budget_ms))  # type: ignore[arg-type]
        return latency

    def _claim(self, trial: optuna.Trial, outcome: TrialOutcome) -> None:
        """Stop before training when the study already has (or is training) all the networks it needs."""
        if not is_surplus(trial.study, trial.number, int(self.cfg.trials)):
            return
        outcome.state = trial_states.SURPLUS
        trial.set_user_attr("state", trial_states.SURPLUS)
        give_back(trial)
        raise SurplusTrial(f"trial {trial.number} is not needed: {self.cfg.trials} trials trained or training")

    def _run(self, trial: optuna.Trial, outcome: TrialOutcome, t0: float) -> float | tuple[float, float]:
        arch, cfg, reference = self._arch_and_cfg(trial)
        outcome.arch, outcome.reference = arch.encode(), reference
        trial.set_user_attr("arch", outcome.arch)
        latency = self._measure(trial, outcome, arch, self._take_draft(trial, outcome))
        if self.goal.is_over_budget(latency):
            outcome.state = trial_states.OVER_BUDGET
            trial.set_user_attr("state", trial_states.OVER_BUDGET)
            return self.goal.over_budget_value(latency)
        self._claim(trial, outcome)
        flops = cost(arch, self.num_classes).flops  # only for networks that train
        trial.set_user_attr("flops", flops)
        trial.set_user_attr("worker", worker_index(self.cfg))
        if os.environ.get("NAS_WORKER_NODE"):  # set by the Ray launcher: the node that trains this trial
            trial.set_user_attr("worker_node", os.environ["NAS_WORKER_NODE"])
        trial.set_user_attr("seed", int(cfg.seed))  # its training seed: the finalist round takes others
        outcome.run_id = run_id = self._start_run(trial, outcome)
        self.tracker.log_metrics(run_id, {"latency_ms": latency, "params": outcome.params, "flops": flops})
        timer = Timer()
        reporter = ReportToPruner(trial, lambda acc: self.goal.score(acc, latency))
        epoch_log = EpochMetricsToMlflow(self.tracker.client, run_id)
        progress = EpochLines(f"      trial {trial.number} ", float(self.cfg.search.get("progress_s", 30)))
        callbacks: list[Any] = [epoch_log, timer, progress]
        if self.goal.can_prune:  # Optuna takes no intermediate values from multi-objective trials
            callbacks.append(reporter)
        fault = (self.cfg.search.get("inject_faults") or {}).get(trial.number)
        if fault:
            callbacks.append(FaultInjection(fault))
        try:
            result = train_arch(cfg, arch, self.datamodule(cfg, arch.resolution), callbacks=callbacks)
        except optuna.TrialPruned:
            outcome.val_acc, outcome.epochs = reporter.last_val_acc, reporter.epochs
            raise
        outcome.val_acc, outcome.epochs = result.val_acc, int(cfg.train.epochs)
        if result.graph_fallback:  # trained all the same, eagerly: the trial stands, the reason is kept
            trial.set_user_attr("cuda_graph_fallback", result.graph_fallback)
            with contextlib.suppress(TrackingError, MlflowException, OSError):
                self.tracker.set_tags(run_id, {"nas.cuda_graph": f"eager fallback: {result.graph_fallback}"})
        trial.set_user_attr("state", trial_states.COMPLETE)
        trial.set_user_attr("val_acc", result.val_acc)
        trial.set_user_attr("epochs", outcome.epochs)
        total, epochs_s = time.perf_counter() - t0, timer.time_elapsed("train")
        trial.set_user_attr("time_s", {"total": total, "epochs": epochs_s})
        metrics = {
            "objective": self.goal.score(result.val_acc, latency),
            "time_total_s": total,
            "time_epochs_s": epochs_s,
            "time_fixed_s": total - epochs_s,
        }
        if epoch_log.error:  # the per-epoch history holds val_acc/val_loss; without it, the final values
            trial.set_user_attr("tracking_error", f"per-epoch metrics not logged: {epoch_log.error}")
            metrics |= {"val_acc": result.val_acc, "val_loss": result.val_loss}
        self._close_run(trial, outcome, trial_states.COMPLETE, metrics)
        return self.goal.value(result.val_acc, latency)
