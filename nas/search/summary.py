"""The end of a search: the summary a person reads, and what the study's MLflow run keeps."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import optuna
from omegaconf import DictConfig

from nas import trial_states
from nas.latency.estimator import CHANGED_ATTR, MEASURED_ATTR, PREDICTED_ATTR
from nas.objectives import ParetoObjective, StudyObjective
from nas.report import publish_plots
from nas.search.console import retrain_lines, round_summary, summary_line, summary_table
from nas.search.finalists import RoundOutcome, log_round
from nas.tracking.runs import runs_page
from nas.tracking.trials import StudyTracker, TrackingError
from nas.urls import mask_url

EXIT_NO_FEASIBLE = 3
EXIT_TOO_MANY_FAILURES = 4
EXIT_TRACKING = 5  # every trial is safe in the study's storage, but MLflow could not record the end


@dataclass
class SearchResult:
    study: optuna.Study
    tracker: StudyTracker
    exit_code: int
    message: str


def _fastest_draw(study: optuna.Study) -> float | None:
    latencies = [t.user_attrs["latency_ms"] for t in trial_states.over_budget(study)]
    latencies += [r["fastest_ms"] for _, r in trial_states.refusals(study)]
    return min(latencies, default=None)


def verified_counts(study: optuna.Study) -> tuple[int, int, int]:
    """Draws the table judged, those measured because they were near the budget, and the budget decisions
    the measurement changed (latency.verify_band): the trials' own, and those of the draws refused before them."""
    judged = [t.user_attrs for t in study.get_trials(deepcopy=False) if PREDICTED_ATTR in t.user_attrs]
    if not judged:  # no table judged this study's draws
        return 0, 0, 0
    refused = [r for _, r in trial_states.refusals(study)]
    return (
        len(judged) + sum(r["count"] for r in refused),
        sum(MEASURED_ATTR in a for a in judged) + sum(r.get("measured", 0) for r in refused),
        sum(bool(a.get(CHANGED_ATTR)) for a in judged) + sum(r.get("changed", 0) for r in refused),
    )


def verified_line(study: optuna.Study) -> list[str]:
    judged, measured, changed = verified_counts(study)
    if not measured:
        return []
    return [f"latency near the budget: {measured} of {judged} draws measured on the target before they were "
            f"judged (latency.verify_band); the measurement changed {changed} budget decisions"]  # fmt: skip


def over_budget_table(study: optuna.Study) -> dict[str, list]:
    """Every trial over the budget, and for each trial the screen refused draws before, the fastest of them
    and one drawn at random (``kind``: trial | refused_fastest | refused_sample; a refused draw was never
    built, so it has no parameter count), fastest first."""
    rows = [(t.user_attrs["latency_ms"], t.number, "trial", t.user_attrs["params"], t.user_attrs.get("reference") or "",
             t.user_attrs["arch"]) for t in trial_states.over_budget(study)]  # fmt: skip
    for number, r in trial_states.refusals(study):
        rows.append((r["fastest_ms"], number, "refused_fastest", None, "", r["fastest_arch"]))
        if r["sample_arch"] != r["fastest_arch"]:
            rows.append((r["sample_ms"], number, "refused_sample", None, "", r["sample_arch"]))
    rows.sort(key=lambda row: row[0])
    keys = ("latency_ms", "trial", "kind", "params", "reference", "arch")
    return {key: [row[i] for row in rows] for i, key in enumerate(keys)}


def _log_over_budget(study: optuna.Study, tracker: StudyTracker, draws: int) -> None:
    """Draws over the budget get no run of their own (they would bury the trained networks): the study's
    run holds their count (``draws``: trials over the budget and refused draws), the fastest of them and a
    table of the trials and of a sample of the refused draws."""
    if not tracker.parent_run_id:
        return
    tracker.log_metrics(tracker.parent_run_id, {"n_over_budget": draws})
    table = over_budget_table(study)
    if not table["trial"]:
        return
    refused = sum(r["count"] for _, r in trial_states.refusals(study))
    tracker.log_metrics(
        tracker.parent_run_id, {"fastest_over_budget_ms": table["latency_ms"][0], "n_refused_draws": refused}
    )
    tracker.log_parent_table(table, "over_budget.json")


def _log_best(study: optuna.Study, tracker: StudyTracker, goal: StudyObjective, best: list) -> None:
    top = [
        {
            "trial": t.number,
            "objective": goal.trial_score(t),
            **{k: t.user_attrs.get(k) for k in ("arch", "val_acc", "latency_ms", "params", "flops", "reference")},
            "params_sampled": t.params,
        }
        for t in best[:5]
    ]
    tracker.log_parent_dict(
        {"study": study.study_name, "objective": goal.describe(), "best": top}, "best/best_trials.json"
    )
    tracker.log_parent_dict(
        {"study": study.study_name, "objective": goal.describe(), "best": top}, "best/best_trials.yaml"
    )
    tracker.log_parent_text(best[0].user_attrs["arch"], "best/best_arch.txt")
    if tracker.parent_run_id:
        ua = best[0].user_attrs
        tracker.log_metrics(
            tracker.parent_run_id,
            {
                "best_val_acc": ua["val_acc"],
                "best_latency_ms": ua["latency_ms"],
                "best_objective": goal.trial_score(best[0]),
            },
        )


def _log_front(tracker: StudyTracker, front: list) -> None:
    table = {
        "trial": [t.number for t in front],
        "val_acc": [t.user_attrs["val_acc"] for t in front],
        "latency_ms": [t.user_attrs["latency_ms"] for t in front],
        "params": [t.user_attrs["params"] for t in front],
        "arch": [t.user_attrs["arch"] for t in front],
    }
    tracker.log_parent_table(table, "pareto_front.json")


def _no_feasible_message(study: optuna.Study, goal: StudyObjective) -> str:
    n, fastest = trial_states.counts(study)[trial_states.OVER_BUDGET], _fastest_draw(study)
    return (
        f"no architecture met the latency budget of {goal.budget_ms} ms: {n} draws were over it "
        f"(fastest {fastest:.4f} ms). Raise latency.budget_ms or use a smaller space"
    )


def _record_study(
    study: optuna.Study,
    tracker: StudyTracker,
    goal: StudyObjective,
    plots: bool,
    failed: bool,
    outcome: RoundOutcome | None,
) -> None:
    """Everything the study's MLflow run gets at the end; raises TrackingError when the server is gone."""
    counts = trial_states.counts(study)
    if tracker.parent_run_id:
        tracker.log_metrics(
            tracker.parent_run_id,
            {"n_trained": counts[trial_states.COMPLETE] + counts[trial_states.PRUNED],
             "n_complete": counts[trial_states.COMPLETE], "n_pruned": counts[trial_states.PRUNED],
             "n_failed": counts[trial_states.FAILED]},
        )  # fmt: skip
    _log_over_budget(study, tracker, counts[trial_states.OVER_BUDGET])
    judged, measured, changed = verified_counts(study)
    if tracker.parent_run_id and judged:
        tracker.log_metrics(tracker.parent_run_id, {"n_verify_measured": measured, "n_verify_changed": changed})
    best = goal.ranked(study)
    if best:
        _log_best(study, tracker, goal, best)
    if isinstance(goal, ParetoObjective):
        _log_front(tracker, goal.front(study))
    if outcome is not None:
        log_round(tracker, outcome)
    if plots:
        publish_plots(study, tracker, goal)
    tracker.close_parent("FAILED" if failed else "FINISHED")


def _winner_pace(study: optuna.Study, outcome: RoundOutcome | None, best: list) -> float | None:
    """Seconds per epoch of the network ``nas.retrain select=best`` takes (the round's winner, else the best)."""
    if outcome is not None and outcome.winner is not None:
        return trial_states.epoch_seconds(study.trials[outcome.winner.candidate.trial])
    return trial_states.epoch_seconds(best[0]) if best else None


def finish(
    study: optuna.Study,
    tracker: StudyTracker,
    cfg: DictConfig,
    goal: StudyObjective,
    stopped: tuple[int, str] | None,
    outcome: RoundOutcome | None = None,
) -> SearchResult:
    counts = trial_states.counts(study)
    best = goal.ranked(study)
    lines = ["", summary_line(study.study_name, counts), *verified_line(study)]
    if best:
        lines += [f"best trials ({goal.describe()}):", summary_table(best, goal)]
    if isinstance(goal, ParetoObjective):
        front = goal.front(study)
        lines += [f"Pareto front (accuracy vs latency): {len(front)} trials", summary_table(front, goal, len(front))]
    if outcome is not None:
        lines += ["", *round_summary(outcome, goal)]
    code, message = 0, ""
    trained = counts[trial_states.COMPLETE] + counts[trial_states.PRUNED]
    if not trained and counts[trial_states.OVER_BUDGET] and goal.hard_budget:
        code, message = EXIT_NO_FEASIBLE, _no_feasible_message(study, goal)
    if stopped:
        code, message = stopped
    try:
        _record_study(study, tracker, goal, bool(cfg.search.plots), bool(code), outcome)
    except TrackingError as exc:  # the study itself is safe in its storage: say so, once, and go on
        unrecorded = f"the study's results are in {mask_url(str(cfg.study.storage))}, but {exc}"
        code, message = (code, f"{message}; {unrecorded}") if code else (EXIT_TRACKING, unrecorded)
    uri = mask_url(str(cfg.mlflow.tracking_uri))
    page = runs_page(uri if uri.startswith("http") else "http://127.0.0.1:5000", tracker.experiment_id)
    ui = f"mlflow ui --backend-store-uri {uri}, then open {page}" if not uri.startswith("http") else f"open {page}"
    lines += [
        "",
        f"compare runs:  {ui}   (experiment '{cfg.mlflow.experiment or study.study_name}')",
        *retrain_lines(cfg, study.study_name, _winner_pace(study, outcome, best)),
    ]
    print("\n".join(lines), flush=True)
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return SearchResult(study, tracker, code, message)
