"""The search loop: open the study and its MLflow parent run, train networks until ``trials`` are trained."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from nas import trial_states
from nas.errors import NasError
from nas.latency.estimator import make_estimator
from nas.latency.table import LatencyTable
from nas.objectives import StudyObjective, objective_from_cfg
from nas.search import workers
from nas.search.console import DrawReporter, trial_line
from nas.search.hparams import resolve_hparams
from nas.search.interrupts import EXIT_CODES, SearchInterrupted, signals_interrupt_search
from nas.search.objective import Objective, TrialFailed, free_trial_memory
from nas.search.study import (
    check_search_cfg,
    enqueue_references,
    make_pruner,
    make_sampler,
    make_storage,
    open_study,
    study_identity,
    study_name,
    with_group_files,
    worker_index,
)
from nas.search.summary import (
    EXIT_NO_FEASIBLE,
    EXIT_TOO_MANY_FAILURES,
    SearchResult,
    finish,
)
from nas.space import Space, require_space
from nas.tracking.runs import connect
from nas.tracking.trials import StudyTracker, TrackingError, flatten_config
from nas.train.run import check_train_cfg, load_splits
from nas.urls import mask_url


def parse_trials(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise NasError(f"trials={value!r} must be a whole number >= 0 (networks trained in the study, e.g. trials=200)")
    return value


def _precheck_budget(cfg: DictConfig, space: Space, estimator: Any, goal: StudyObjective) -> None:
    """Refuse a budget that not even the space's cheapest network meets, before any trial runs."""
    if not goal.hard_budget or not cfg.search.precheck_budget:
        return
    budget = goal.budget_ms
    cheapest = space.extreme("min")
    latency = estimator.latency_ms(cheapest)
    if latency > budget:
        raise NasError(
            f"latency.budget_ms={budget} cannot be met: the cheapest network of space {space.name} takes "
            f"{latency:.4f} ms on {estimator.settings.device_name()} (batch {estimator.settings.batch_size}). "
            f"Raise latency.budget_ms above {latency:.4f}, or use a smaller space"
        )


def _study_params(cfg: DictConfig, space: Space) -> dict[str, Any]:
    params = flatten_config(cfg)
    params["study.storage"] = mask_url(str(cfg.study.storage))
    params["mlflow.tracking_uri"] = mask_url(str(cfg.mlflow.tracking_uri))
    params["space.file"] = str(space.path)
    return params


def _sweep_stale(study: optuna.Study, tracker: StudyTracker) -> list[int]:
    """Fail (and re-queue) trials whose worker stopped beating; close their MLflow runs. Returns running trials."""
    optuna.storages.fail_stale_trials(study)
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    with contextlib.suppress(TrackingError):  # a tracking outage shows in the trials themselves; retried later
        tracker.close_stale_runs(set(running))
    return running


def _data_identity(cfg: DictConfig, splits: Any) -> dict[str, Any]:
    h, w = (int(v) for v in splits.train_x.shape[-2:])
    root = cfg.data.get("root")
    return {"root": None if root is None else str(root), "fingerprint": splits.fingerprint(), "image_size": f"{h}x{w}"}


def run_search(cfg: DictConfig) -> SearchResult:
    target = parse_trials(cfg.trials)
    cfg = with_group_files(cfg)
    check_search_cfg(cfg)
    goal = objective_from_cfg(cfg)
    make_sampler(cfg)  # a sampler or pruner file that cannot be made fails here, before any data is loaded
    make_pruner(cfg, goal)
    check_train_cfg(cfg)
    space = require_space(cfg)
    hparams = resolve_hparams(cfg.search.hparams, cfg)  # bad keys or ranges fail before anything starts
    worker = cfg.search.role == "worker"
    plans = [] if worker else workers.plan(cfg)
    workers.check_latency_for_concurrency(cfg, len(plans))
    client = connect(cfg.mlflow)  # fails fast on an unreachable server, before any data is loaded
    storage = make_storage(cfg)  # likewise for an unreachable study storage
    splits = load_splits(cfg.data)
    num_classes = len(splits.classes)
    estimator = make_estimator(cfg.latency, num_classes)
    if isinstance(getattr(estimator, "table", None), LatencyTable):
        from nas.latency.fidelity import build_table

        build_table(space, estimator.table, num_classes, int(cfg.latency.calibrate), int(cfg.seed))
    _precheck_budget(cfg, space, estimator, goal)
    data = _data_identity(cfg, splits)
    latency = {**estimator.settings.key_fields(), "estimator": str(cfg.latency.estimator)}
    identity = study_identity(cfg, space, goal, latency, data, hparams)
    study, created = open_study(cfg, study_name(cfg, space, data["fingerprint"]), identity, storage, goal)
    tracker = StudyTracker(client, cfg, study.study_name)
    if worker:
        tracker.join_parent(study)
    else:
        tracker.open_parent(study, _study_params(cfg, space), space.path)
        if created and cfg.search.enqueue_references:
            enqueue_references(study, space)
    objective = Objective(cfg, space, splits, estimator, tracker, num_classes, goal)
    who = f"worker {worker_index(cfg)}: " if worker else ""
    print(
        f"{who}study {study.study_name} ({'new' if created else 'resumed'}, {trial_states.count_trained(study)}/"
        f"{target} networks trained) on {mask_url(str(cfg.study.storage))}; space {space.name}; data {cfg.data.name}; "
        f"objective {goal.describe()}; latency on {estimator.settings.device_name()}",
        flush=True,
    )
    if workers.needs_processes(plans):
        return _run_workers(cfg, study, tracker, plans, target, goal)
    try:
        with signals_interrupt_search():
            stopped = _trial_loop(cfg, study, tracker, objective, target, storage)
    except (SearchInterrupted, KeyboardInterrupt) as exc:
        return _interrupted(exc, study, tracker, objective, target, worker)
    if worker:  # the main process relays this line and names it in its own summary
        if stopped:
            print(f"error: {stopped[1]}", file=sys.stderr, flush=True)
        return SearchResult(study, tracker, stopped[0] if stopped else 0, stopped[1] if stopped else "")
    return finish(study, tracker, cfg, goal, stopped)


class RunningTrialsWait:
    """Waiting at the end of a search for trials that other processes run, or that a killed one left RUNNING.

    Optuna fails a trial whose heartbeat is older than the grace period, but a process killed between
    ``ask()`` and its first heartbeat leaves a trial with none, which it never reclaims: every rerun would
    wait for ever. After two grace periods without progress, each trial still waited for gets one
    heartbeat recorded (harmless for a live trial, whose own thread keeps beating), so Optuna's rule
    applies to it and the wait ends within one more grace period.
    """

    def __init__(self, storage: Any, study_name: str, heartbeat_s: int, announce: bool) -> None:
        self.storage = storage
        self.study_name = study_name
        self.grace = 2 * heartbeat_s
        self.announce = announce
        self.since: float | None = None
        self.nudged: set[int] = set()

    def reset(self) -> None:
        self.since = None

    def step(self, running: list[int]) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
            if self.announce:
                print(
                    f"waiting for {len(running)} running trial(s) {running} (another worker, or left by a killed "
                    f"run: such trials are retried after {self.grace} s without heartbeat)",
                    flush=True,
                )
        elif now - self.since > 2 * self.grace:
            study_id = self.storage.get_study_id_from_name(self.study_name)
            for number in sorted(set(running) - self.nudged):
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
                self.storage.record_heartbeat(trial_id)
                self.nudged.add(number)
                print(
                    f"trial {number} made no progress for {now - self.since:.0f} s: if its process is gone (killed "
                    f"before its first heartbeat) it is failed and retried in {self.grace} s",
                    flush=True,
                )
        time.sleep(max(1.0, min(5.0, self.grace / 2)))


def _trial_loop(
    cfg: DictConfig, study: optuna.Study, tracker: StudyTracker, objective: Objective, target: int, storage: Any
) -> tuple[int, str] | None:
    """Train networks until ``target`` are trained in the study (across all workers); returns why it stopped
    early (exit code and message), if it did."""
    failures, max_failures = 0, int(cfg.search.max_consecutive_failures)
    max_draws = int(cfg.search.max_draws_over_budget)
    goal = objective.goal
    draws = DrawReporter(goal.budget_ms)

    def report(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        outcome = objective.outcomes[-1]
        if outcome.state == trial_states.SURPLUS:  # another worker took the last slot: nothing ran
            return
        if outcome.state == trial_states.OVER_BUDGET:
            draws.add(outcome)
            return
        best = goal.ranked(study)
        over = len(trial_states.over_budget(study))
        line = trial_line(outcome, trial_states.count_trained(study), target, best[0] if best else None, goal, over)
        print(draws.flush() + line, flush=True)

    running = _sweep_stale(study, tracker)
    wait = RunningTrialsWait(storage, study.study_name, int(cfg.search.heartbeat_s), cfg.search.role != "worker")
    while True:
        finished = trial_states.count_trained(study)
        if finished >= target:
            return None
        if finished + len(running) >= target:
            # The rest is being run elsewhere, or by a killed process whose heartbeat has yet to expire.
            wait.step(running)
            running = _sweep_stale(study, tracker)
            continue
        wait.reset()
        if max_failures and failures >= max_failures:  # 0: never stop for failures
            reasons = "; ".join(sorted({o.reason or "" for o in objective.outcomes[-failures:]}))
            return EXIT_TOO_MANY_FAILURES, (
                f"stopped after {failures} consecutive failed trials (search.max_consecutive_failures="
                f"{max_failures}): {reasons}"
            )
        if draws.streak >= max_draws:
            return EXIT_NO_FEASIBLE, draws.give_up_message(finished, target, max_draws)
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=[report], gc_after_trial=False)
        last = objective.outcomes[-1].state if objective.outcomes else None
        failures = failures + 1 if last == trial_states.FAILED else 0
        if last in (trial_states.COMPLETE, trial_states.PRUNED, trial_states.FAILED):  # not after every draw
            draws.reset()
            free_trial_memory()
            # Optuna fails a killed process's trial once its heartbeat is stale (at the next ask()); its
            # MLflow run is ours to close, now rather than at the next start-up.
            running = _sweep_stale(study, tracker)
        else:
            running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


def _run_workers(
    cfg: DictConfig,
    study: optuna.Study,
    tracker: StudyTracker,
    plans: list[workers.WorkerPlan],
    target: int,
    goal: StudyObjective,
) -> SearchResult:
    """Start the worker processes, wait for them, then summarise the study as one search."""
    where = ", ".join(f"GPU {p.gpu}" if p.gpu is not None else "CPU" for p in plans)
    print(f"starting {len(plans)} worker processes ({where})", flush=True)
    folder = Path("outputs") / "workers" / study.study_name
    started = workers.spawn(cfg, plans, folder)
    try:
        with signals_interrupt_search():
            codes = workers.wait_all(started)
    except SearchInterrupted as exc:
        workers.wait_all(started, forward=exc.signame)
        with contextlib.suppress(TrackingError):
            tracker.close_parent("KILLED")
        message = (
            f"interrupted by {exc.signame}: workers stopped, running trials recorded as failed; "
            f"{trial_states.count_trained(study)}/{target} networks trained. Rerun the same command to resume"
        )
        print(f"\n{message}", file=sys.stderr, flush=True)
        return SearchResult(study, tracker, exc.exit_code, message)
    stopped = None
    trained = trial_states.count_trained(study)
    if trained < target:
        code = EXIT_NO_FEASIBLE if EXIT_NO_FEASIBLE in codes else EXIT_TOO_MANY_FAILURES
        reasons = "; ".join(f"worker {w.plan.index}: {e}" for w in started for e in w.errors) or "no reason given"
        stopped = (
            code,
            (
                f"workers exited (codes {codes}) with {trained}/{target} networks trained ({reasons}); "
                f"rerun the same command to resume"
            ),
        )
    return finish(study, tracker, cfg, goal, stopped)


def _interrupted(
    exc: BaseException, study: optuna.Study, tracker: StudyTracker, objective: Objective, target: int, worker: bool
) -> SearchResult:
    cause = exc if isinstance(exc, SearchInterrupted) else exc.__cause__
    signame = cause.signame if isinstance(cause, SearchInterrupted) else "SIGINT"
    last = objective.outcomes[-1] if objective.outcomes else None
    what = f"trial {last.number} recorded as failed; " if last and last.reason and "interrupted" in last.reason else ""
    if not worker:
        with contextlib.suppress(TrackingError):
            tracker.close_parent("KILLED")
    message = (
        f"interrupted by {signame}: {what}{trial_states.count_trained(study)}/{target} networks trained. "
        f"Rerun the same command to resume"
    )
    print(f"\n{message}", file=sys.stderr, flush=True)
    return SearchResult(study, tracker, EXIT_CODES.get(signame, 130), message)
