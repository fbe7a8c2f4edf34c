"""The search loop: open the study and its MLflow parent run, run trials until ``trials`` have finished."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from nas.errors import NasError
from nas.latency.estimator import make_estimator
from nas.latency.table import LatencyTable
from nas.report import publish_plots
from nas.search import workers
from nas.search.console import ranked, retrain_command, state_counts, summary_table, trial_line
from nas.search.hparams import resolve_hparams
from nas.search.interrupts import EXIT_CODES, SearchInterrupted, signals_interrupt_search
from nas.search.objective import Objective, TrialFailed
from nas.search.study import (
    check_search_cfg,
    count_finished,
    enqueue_references,
    is_multi_objective,
    make_storage,
    mask_url,
    open_study,
    study_identity,
)
from nas.space import Space, require_space
from nas.tracking.runs import connect
from nas.tracking.trials import StudyTracker, flatten_config
from nas.train.run import check_train_cfg, load_splits

EXIT_NO_FEASIBLE = 3
EXIT_TOO_MANY_FAILURES = 4


@dataclass
class SearchResult:
    study: optuna.Study
    tracker: StudyTracker
    exit_code: int
    message: str


def parse_trials(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise NasError(f"trials={value!r} must be a whole number >= 0 (trials finished in the study, e.g. trials=200)")
    return value


def _precheck_budget(cfg: DictConfig, space: Space, estimator: Any) -> None:
    """Refuse a budget that not even the space's cheapest network meets, before any trial runs."""
    budget = cfg.latency.budget_ms
    if budget is None or cfg.search.objective != "accuracy" or not cfg.search.precheck_budget:
        return
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
    params["space.file"] = str(space.path)
    return params


def _finish(study: optuna.Study, tracker: StudyTracker, cfg: DictConfig, stopped: str | None) -> SearchResult:
    counts = state_counts(study)
    best = ranked(study)
    lines = [
        "",
        f"study {study.study_name}: {counts['complete']} complete, {counts['infeasible']} infeasible, "
        f"{counts['pruned']} pruned, {counts['failed']} failed",
    ]
    if tracker.parent_run_id:
        tracker.log_metrics(tracker.parent_run_id, {f"n_{k}": v for k, v in counts.items()})
    if best:
        lines += ["best trials (feasible, by validation accuracy):", summary_table(best)]
        top = [
            {
                "trial": t.number,
                **{k: t.user_attrs.get(k) for k in ("arch", "val_acc", "latency_ms", "params", "flops", "reference")},
                "params_sampled": t.params,
            }
            for t in best[:5]
        ]
        tracker.log_parent_dict({"study": study.study_name, "best": top}, "best/best_trials.json")
        tracker.log_parent_dict({"study": study.study_name, "best": top}, "best/best_trials.yaml")
        tracker.log_parent_text(best[0].user_attrs["arch"], "best/best_arch.txt")
        if tracker.parent_run_id:
            tracker.log_metrics(
                tracker.parent_run_id,
                {"best_val_acc": best[0].user_attrs["val_acc"], "best_latency_ms": best[0].user_attrs["latency_ms"]},
            )
    if is_multi_objective(cfg):
        front = [t for t in study.best_trials if t.user_attrs.get("state") == "complete"]
        front.sort(key=lambda t: t.values[1])
        table = {
            "trial": [t.number for t in front],
            "val_acc": [t.values[0] for t in front],
            "latency_ms": [t.values[1] for t in front],
            "params": [t.user_attrs["params"] for t in front],
            "arch": [t.user_attrs["arch"] for t in front],
        }
        if tracker.parent_run_id:
            tracker.client.log_table(tracker.parent_run_id, table, "pareto_front.json")
        lines += [f"Pareto front (accuracy vs latency): {len(front)} trials", summary_table(front, limit=len(front))]
    if cfg.search.plots:
        publish_plots(study, tracker)
    code, message = 0, ""
    if not best and counts["infeasible"] and cfg.latency.budget_ms is not None:
        fastest = min(
            t.user_attrs["latency_ms"] for t in study.get_trials(deepcopy=False) if "latency_ms" in t.user_attrs
        )
        code = EXIT_NO_FEASIBLE
        message = (
            f"no architecture met the latency budget of {cfg.latency.budget_ms} ms: {counts['infeasible']} trials "
            f"were over it (fastest {fastest:.4f} ms). Raise latency.budget_ms or use a smaller space"
        )
    if stopped:
        code, message = EXIT_TOO_MANY_FAILURES, stopped
    uri = str(cfg.mlflow.tracking_uri)
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
    lines += [
        "",
        f"compare runs:  {ui}   (experiment '{cfg.mlflow.experiment or study.study_name}')",
        f"retrain best:  {retrain_command(cfg, study.study_name)}",
    ]
    tracker.close_parent("FAILED" if code else "FINISHED")
    print("\n".join(lines), flush=True)
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return SearchResult(study, tracker, code, message)


def _sweep_stale(study: optuna.Study, tracker: StudyTracker) -> list[int]:
    """Fail (and re-queue) trials whose worker stopped beating; close their MLflow runs. Returns running trials."""
    optuna.storages.fail_stale_trials(study)
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    tracker.close_stale_runs(set(running))
    return running


def run_search(cfg: DictConfig) -> SearchResult:
    target = parse_trials(cfg.trials)
    check_search_cfg(cfg)
    check_train_cfg(cfg)
    space = require_space(cfg)
    resolve_hparams(cfg.search.hparams, cfg)  # bad keys or ranges fail before anything starts
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
    _precheck_budget(cfg, space, estimator)
    identity = study_identity(cfg, space, estimator.settings.key_fields())
    study, created = open_study(cfg, space, identity, storage)
    tracker = StudyTracker(client, cfg, study.study_name)
    if worker:
        tracker.join_parent(study)
    else:
        tracker.open_parent(study, _study_params(cfg, space), space.path)
        if created and cfg.search.enqueue_references:
            enqueue_references(study, space)
    objective = Objective(cfg, space, splits, estimator, tracker, num_classes)
    who = f"worker {cfg.search.worker_index}: " if worker else ""
    print(
        f"{who}study {study.study_name} ({'new' if created else 'resumed'}, {count_finished(study)}/{target} trials "
        f"finished) on {mask_url(str(cfg.study.storage))}; space {space.name}; data {cfg.data.name}; "
        f"latency on {estimator.settings.device_name()}"
        + (f", budget {cfg.latency.budget_ms} ms" if cfg.latency.budget_ms is not None else ""),
        flush=True,
    )
    if len(plans) > 1:
        return _run_workers(cfg, study, tracker, plans, target)
    try:
        with signals_interrupt_search():
            stopped = _trial_loop(cfg, study, tracker, objective, target)
    except (SearchInterrupted, KeyboardInterrupt) as exc:
        return _interrupted(exc, study, tracker, objective, target, worker)
    if worker:
        return SearchResult(study, tracker, 0, "")
    return _finish(study, tracker, cfg, stopped)


def _trial_loop(
    cfg: DictConfig, study: optuna.Study, tracker: StudyTracker, objective: Objective, target: int
) -> str | None:
    """Run trials until ``target`` have finished in the study (across all workers); returns why it stopped early."""
    failures, max_failures, waiting = 0, int(cfg.search.max_consecutive_failures), False
    poll_s = max(1.0, min(5.0, float(cfg.search.heartbeat_s)))

    last_state: list[str] = []

    def report(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        last_state[:] = [frozen.user_attrs.get("state", "failed")]
        if last_state[0] == "surplus":  # another worker took the last slot: nothing ran
            return
        best = ranked(study)
        print(trial_line(objective.outcomes[-1], count_finished(study), target, best[0] if best else None), flush=True)

    running = _sweep_stale(study, tracker)
    while True:
        finished = count_finished(study)
        if finished >= target:
            return None
        if finished + len(running) >= target:
            # The rest is being run elsewhere, or by a killed process whose heartbeat has yet to expire.
            if not waiting and cfg.search.role != "worker":
                print(
                    f"waiting for {len(running)} running trial(s) {running} (another worker, or left by a killed "
                    f"run: such trials are retried after {2 * int(cfg.search.heartbeat_s)} s without heartbeat)",
                    flush=True,
                )
                waiting = True
            time.sleep(poll_s)
            running = _sweep_stale(study, tracker)
            continue
        if failures >= max_failures:
            reasons = "; ".join(sorted({o.reason or "" for o in objective.outcomes[-failures:]}))
            return (
                f"stopped after {failures} consecutive failed trials (search.max_consecutive_failures="
                f"{max_failures}): {reasons}"
            )
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=[report], gc_after_trial=False)
        failures = failures + 1 if last_state == ["failed"] else 0
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


def _run_workers(
    cfg: DictConfig, study: optuna.Study, tracker: StudyTracker, plans: list[workers.WorkerPlan], target: int
) -> SearchResult:
    """Start the worker processes, wait for them, then summarise the study as one search."""
    where = ", ".join(f"GPU {p.gpu}" if p.gpu is not None else "CPU" for p in plans)
    print(f"starting {len(plans)} worker processes ({where})", flush=True)
    folder = Path("outputs") / "workers" / study.study_name
    procs = workers.spawn(cfg, plans, folder)
    try:
        with signals_interrupt_search():
            codes = workers.wait_all(procs)
    except SearchInterrupted as exc:
        workers.wait_all(procs, forward=exc.signame)
        tracker.close_parent("KILLED")
        message = (
            f"interrupted by {exc.signame}: workers stopped, running trials recorded as failed; "
            f"{count_finished(study)}/{target} trials finished. Rerun the same command to resume"
        )
        print(f"\n{message}", file=sys.stderr, flush=True)
        return SearchResult(study, tracker, exc.exit_code, message)
    stopped = None
    if count_finished(study) < target:
        stopped = (
            f"workers exited (codes {codes}) with {count_finished(study)}/{target} trials finished; "
            f"see their output above, then rerun the same command to resume"
        )
    return _finish(study, tracker, cfg, stopped)


def _interrupted(
    exc: BaseException, study: optuna.Study, tracker: StudyTracker, objective: Objective, target: int, worker: bool
) -> SearchResult:
    cause = exc if isinstance(exc, SearchInterrupted) else exc.__cause__
    signame = cause.signame if isinstance(cause, SearchInterrupted) else "SIGINT"
    last = objective.outcomes[-1] if objective.outcomes else None
    what = f"trial {last.number} recorded as failed; " if last and last.reason and "interrupted" in last.reason else ""
    if not worker:
        tracker.close_parent("KILLED")
    message = (
        f"interrupted by {signame}: {what}{count_finished(study)}/{target} trials finished. "
        f"Rerun the same command to resume"
    )
    print(f"\n{message}", file=sys.stderr, flush=True)
    return SearchResult(study, tracker, EXIT_CODES.get(signame, 130), message)
