"""The search loop: open the study and its MLflow parent run, train networks until ``trials`` are trained."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from nas import trial_states
from nas.data.folders import ImageFiles
from nas.errors import NasError
from nas.interrupts import EXIT_CODES, Interrupted, signals_interrupt
from nas.latency.estimator import TableLatency, VerifiedLatency, make_estimator
from nas.latency.runtime import Runtime, runtime_config
from nas.objectives import StudyObjective, objective_from_cfg
from nas.search import workers
from nas.search.console import DrawReporter, trial_line
from nas.search.finalists import FinalistRound, FinalistTraining, RoundSettings, open_round_study, work_through
from nas.search.hparams import resolve_hparams
from nas.search.launchers import Launcher, make_launcher
from nas.search.objective import Objective, TrialFailed, free_trial_memory
from nas.search.study import (
    check_search_cfg,
    enqueue_references,
    make_pruner,
    make_sampler,
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
from nas.search.waiting import RunningTrialsWait, wait_for_main
from nas.space import Space, require_space
from nas.studies import FINALISTS_SUFFIX, LATENCY_ATTR, make_storage, stored_latency_table
from nas.tracking.runs import connect
from nas.tracking.trials import PARENT_ATTR, StudyTracker, TrackingError, flatten_config
from nas.train.run import check_data_cfg, check_train_cfg, load_training_data
from nas.urls import mask_url

PHASES = ("search", "finalists")  # search.phase: what a worker process does


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
            f"{latency:.4f} ms in {estimator.settings.runtime.label()} on {estimator.settings.device_name()} "
            f"(batch {estimator.settings.batch_size}). "
            f"Raise latency.budget_ms above {latency:.4f}, or use a smaller space"
        )


def _study_params(cfg: DictConfig, space: Space, runtime: Runtime) -> dict[str, Any]:
    params = flatten_config(cfg)
    params["latency.runtime.identity"] = str(runtime.identity())  # its version too
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


def settle_storage(cfg: DictConfig, data: Any) -> DictConfig:
    """The storage ``auto`` chose, written into the configuration workers get: they must not each
    decide again on memory that the others are filling."""
    chosen = "stream" if isinstance(data, ImageFiles) else "memory"
    if cfg.data.get("storage", "auto") == chosen:
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.update(out, "data.storage", chosen, force_add=True)
    return out


def without_progress_bar(cfg: DictConfig) -> DictConfig:
    """Trials print their own lines (and epoch lines when one is slow): Lightning's bar would break them up."""
    if cfg.train.get("progress_bar") is False:
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.update(out, "train.progress_bar", False)
    return out


def _data_identity(cfg: DictConfig, splits: Any) -> dict[str, Any]:
    _, h, w = splits.image_shape
    root = cfg.data.get("root")
    return {"root": None if root is None else str(root), "fingerprint": splits.fingerprint(), "image_size": f"{h}x{w}"}


@dataclass
class Session:
    """One process's share of a search: the study, its tracking, and what every trial and finalist run needs."""

    cfg: DictConfig
    study: optuna.Study
    created: bool
    tracker: StudyTracker
    objective: Objective
    storage: Any
    plans: list[workers.WorkerPlan]
    target: int
    rounds: RoundSettings
    phase: str  # search.phase, checked
    launcher: Launcher

    @property
    def worker(self) -> bool:
        return self.cfg.search.role == "worker"

    @property
    def goal(self) -> StudyObjective:
        return self.objective.goal

    def finalist_round(self) -> FinalistRound:
        o = self.objective
        return FinalistRound(
            self.cfg, self.study, self.tracker, o.goal, self.rounds, o.estimator.settings, o.num_classes, self.storage
        )

    def train_finalists(self, round_study: optuna.Study) -> None:
        training = FinalistTraining(self.cfg, self.tracker, self.objective.datamodule)
        work_through(round_study, training, self.storage, int(self.cfg.search.heartbeat_s))


def check_phase(cfg: DictConfig) -> str:
    phase = cfg.search.get("phase", "search")
    if phase not in PHASES:
        raise NasError(f"search.phase={phase!r} is not one of {', '.join(PHASES)}")
    if phase == "finalists" and cfg.search.role != "worker":
        raise NasError(
            "search.phase=finalists is for workers joining a running finalist round (with search.role=worker); "
            "rerun the search command itself to run or resume the round"
        )
    return str(phase)


def open_session(cfg: DictConfig) -> Session:
    """Check everything that can be checked, then load the data and open (or resume) the study and its run."""
    target = parse_trials(cfg.trials)
    cfg = without_progress_bar(with_group_files(cfg))
    check_search_cfg(cfg)
    phase = check_phase(cfg)
    rounds = RoundSettings.from_cfg(cfg)
    goal = objective_from_cfg(cfg)
    make_sampler(cfg)  # a sampler or pruner file that cannot be made fails here, before any data is loaded
    make_pruner(cfg, goal)
    check_train_cfg(cfg)
    check_data_cfg(cfg.data)
    space = require_space(cfg)
    hparams = resolve_hparams(cfg.search.hparams, cfg)  # bad keys or ranges fail before anything starts
    worker = cfg.search.role == "worker"
    launcher = make_launcher(cfg)
    plans = [] if worker else launcher.plan(cfg)
    workers.check_latency_for_concurrency(cfg, len(plans))
    if plans:
        launcher.check(cfg, plans)  # e.g. a Ray cluster reached, before any data is loaded
    client = connect(cfg.mlflow)  # fails fast on an unreachable server, before any data is loaded
    storage = make_storage(cfg)  # likewise for an unreachable study storage
    per_device = int(cfg.search.trials_per_gpu) if any(p.gpu is not None for p in plans) else 1
    splits = load_training_data(cfg, processes=max(1, len(plans)), per_device=per_device)
    cfg = settle_storage(cfg, splits)
    num_classes = len(splits.classes)
    data = _data_identity(cfg, splits)
    name = study_name(cfg, space, data["fingerprint"])
    if worker:  # started at once with its main process (an array job): join only a study the main prepared
        wait_for_main(storage, name, PARENT_ATTR, float(cfg.search.get("join_timeout_s", 600)))
    stored = stored_latency_table(storage, name)  # a resumed study predicts with its own table
    estimator = make_estimator(cfg.latency, num_classes, space, int(cfg.seed), stored)
    local = (cfg.latency.get("target") or "local") == "local"
    if isinstance(estimator, VerifiedLatency) and (len(plans) > 1 or worker) and local:  # band=auto: not beside
        estimator.band, estimator.source = 0.0, "off: other workers train beside its measurements on this machine"
    _precheck_budget(cfg, space, estimator, goal)
    runtime = estimator.settings.runtime
    latency = {**estimator.settings.key_fields(), "estimator": str(cfg.latency.estimator), "runtime": runtime.label(),
               "runtime_config": runtime_config(cfg.latency.get("runtime")),
               "target": cfg.latency.get("target")}  # fmt: skip
    identity = study_identity(cfg, space, goal, latency, data, hparams)
    study, created = open_study(cfg, name, identity, storage, goal)
    if isinstance(estimator, (TableLatency, VerifiedLatency)) and LATENCY_ATTR not in study.user_attrs and not worker:
        study.set_user_attr(LATENCY_ATTR, estimator.model.record())
    tracker = StudyTracker(client, cfg, study.study_name)
    if worker:
        tracker.join_parent(study)
    else:
        tracker.open_parent(study, _study_params(cfg, space, estimator.settings.runtime), space.path)
        if created and cfg.search.enqueue_references:
            enqueue_references(study, space)
    objective = Objective(cfg, space, splits, estimator, tracker, num_classes, goal)
    objective.screen_draws(study)
    return Session(cfg, study, created, tracker, objective, storage, plans, target, rounds, phase, launcher)


def run_search(cfg: DictConfig) -> SearchResult:
    s = open_session(cfg)
    study, cfg, o = s.study, s.cfg, s.objective
    who = f"worker {worker_index(cfg)}: " if s.worker else ""
    print(
        f"{who}study {study.study_name} ({'new' if s.created else 'resumed'}, {trial_states.count_trained(study)}/"
        f"{s.target} networks trained) on {mask_url(str(cfg.study.storage))}; space {o.space.name}; data "
        f"{cfg.data.name}; objective {s.goal.describe()}; latency in {o.estimator.settings.runtime.label()} on "
        f"{o.estimator.settings.device_name()}; MLflow "
        f"{mask_url(str(cfg.mlflow.tracking_uri))}",
        flush=True,
    )
    if isinstance(o.estimator, VerifiedLatency) and not s.worker:
        print(o.estimator.describe(), flush=True)
    if s.phase == "finalists":
        return _finalist_worker(s)
    if s.plans:
        return _run_workers(s)
    try:
        with signals_interrupt():
            stopped = _trial_loop(cfg, study, s.tracker, o, s.target, s.storage)
    except (Interrupted, KeyboardInterrupt) as exc:
        return _interrupted(exc, study, s.tracker, o, s.target, s.worker)
    if s.worker:  # the main process relays this line and names it in its own summary
        if stopped:
            print(f"error: {stopped[1]}", file=sys.stderr, flush=True)
        return SearchResult(study, s.tracker, stopped[0] if stopped else 0, stopped[1] if stopped else "")
    return _conclude(s, stopped, s.train_finalists)


def _finalist_worker(s: Session) -> SearchResult:
    """A worker of the finalist round: train queued finalist runs until none is left."""
    names = optuna.get_all_study_names(s.storage)
    name = s.study.study_name + FINALISTS_SUFFIX
    if name in names:
        try:
            with signals_interrupt():
                s.train_finalists(open_round_study(s.study, s.storage, int(s.cfg.seed)))
        except (Interrupted, KeyboardInterrupt) as exc:
            signame = _signame(exc)
            return SearchResult(s.study, s.tracker, EXIT_CODES.get(signame, 130), f"interrupted by {signame}")
    else:
        print(f"no finalist round of study {s.study.study_name} to join yet", flush=True)
    return SearchResult(s.study, s.tracker, 0, "")


def _conclude(s: Session, stopped: tuple[int, str] | None, train: Callable[[optuna.Study], object]) -> SearchResult:
    """After a search that ran to its end: the finalist round (``train`` runs its queue), then the summary."""
    outcome = None
    if not stopped and s.rounds.count:
        round_ = s.finalist_round()
        try:
            with signals_interrupt():
                done = round_.prepare()
                if round_.round_study is not None:
                    print(round_.describe(done), flush=True)
                    train(round_.round_study)
                    outcome = round_.conclude()
        except (Interrupted, KeyboardInterrupt) as exc:
            return _interrupted_round(exc, s)
        if outcome is not None:
            outcome.runs = round_.runs()
    return finish(s.study, s.tracker, s.cfg, s.goal, stopped, outcome)


def _interrupted_round(exc: BaseException, s: Session) -> SearchResult:
    signame = _signame(exc)
    message = (
        f"interrupted by {signame} in the finalist round: the search's trials and the finished finalist runs are "
        f"kept. Rerun the same command to resume the round"
    )
    return _stopped_by_signal(s.study, s.tracker, signame, message)


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
        draws.add(outcome)  # the draws refused before it, and itself when over the budget
        if outcome.state in (trial_states.SURPLUS, trial_states.OVER_BUDGET):  # surplus: nothing ran
            return
        best = goal.ranked(study)
        over = trial_states.counts(study)[trial_states.OVER_BUDGET]
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


def _spawn_and_wait(s: Session, extra: tuple[str, ...] = ()) -> tuple[list[int], list[Any]]:
    """Start the workers and wait for them; a signal is passed on to them before it is raised here."""
    print(s.launcher.describe(s.plans), flush=True)
    folder = Path("outputs") / "workers" / s.study.study_name
    s.objective.release_data()  # each worker loads its own copy
    started = s.launcher.start(s.cfg, s.plans, folder, extra)
    try:
        with signals_interrupt():
            codes = started.wait()
    except Interrupted as exc:
        started.wait(forward=exc.signame)
        raise
    for w in started.workers:  # which workers died and why, even when the others finished the study
        if w.deaths:
            print(f"worker {w.plan.index} died {len(w.deaths)} time(s): {'; '.join(w.deaths)}", flush=True)
    return codes, started.workers


def _run_workers(s: Session) -> SearchResult:
    """Start the worker processes, wait for them, then run the finalist round with them and summarise."""
    study, target = s.study, s.target
    try:
        codes, started = _spawn_and_wait(s)
    except Interrupted as exc:
        message = (
            f"interrupted by {exc.signame}: workers stopped, running trials recorded as failed; "
            f"{trial_states.count_trained(study)}/{target} networks trained. Rerun the same command to resume"
        )
        return _stopped_by_signal(study, s.tracker, exc.signame, message)
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

    def train_in_workers(round_study: optuna.Study) -> None:
        _spawn_and_wait(s, ("search.phase=finalists",))
        s.train_finalists(round_study)  # whatever a worker that died left in the queue

    return _conclude(s, stopped, train_in_workers)


def _signame(exc: BaseException) -> str:
    cause = exc if isinstance(exc, Interrupted) else exc.__cause__
    return cause.signame if isinstance(cause, Interrupted) else "SIGINT"


def _stopped_by_signal(
    study: optuna.Study, tracker: StudyTracker, signame: str, message: str, close_parent: bool = True
) -> SearchResult:
    """The study run ends KILLED (by the main process only), and the reason is said once, on stderr."""
    if close_parent:
        with contextlib.suppress(TrackingError):
            tracker.close_parent("KILLED")
    print(f"\n{message}", file=sys.stderr, flush=True)
    return SearchResult(study, tracker, EXIT_CODES.get(signame, 130), message)


def _interrupted(
    exc: BaseException, study: optuna.Study, tracker: StudyTracker, objective: Objective, target: int, worker: bool
) -> SearchResult:
    signame = _signame(exc)
    last = objective.outcomes[-1] if objective.outcomes else None
    what = f"trial {last.number} recorded as failed; " if last and last.reason and "interrupted" in last.reason else ""
    message = (
        f"interrupted by {signame}: {what}{trial_states.count_trained(study)}/{target} networks trained. "
        f"Rerun the same command to resume"
    )
    return _stopped_by_signal(study, tracker, signame, message, close_parent=not worker)
