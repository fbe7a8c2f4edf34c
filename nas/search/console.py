"""What the user reads during and after a search: one line per trial, then a summary."""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from nas.search.objective import TrialOutcome
from nas.search.study import mask_url
from nas.train.run import recipe, recipe_overrides

DEFAULT_STORAGE = "sqlite:///outputs/optuna.db"
DEFAULT_TRACKING = "sqlite:///outputs/mlflow.db"


def retrain_command(cfg: DictConfig, study_name: str) -> str:
    """The retrain command for this study, with the settings it needs to find the study and train alike."""
    parts = [f"python -m nas.retrain study.name={study_name}", f"data={cfg.data.name}"]
    root = cfg.data.get("root")
    if root not in (None, "data"):
        parts.append(f"data.root={root}")
    parts.append(recipe_overrides(recipe(cfg)))
    if str(cfg.study.storage) != DEFAULT_STORAGE:
        parts.append(f"study.storage={mask_url(str(cfg.study.storage))}")
    if str(cfg.mlflow.tracking_uri) != DEFAULT_TRACKING:
        parts.append(f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}")
    return " ".join(p for p in parts if p)


def feasible_complete(study: optuna.Study) -> list[FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("state") == "complete"
    ]


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible, trained trials, most accurate first."""
    return sorted(feasible_complete(study), key=lambda t: -t.user_attrs["val_acc"])


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}K"


def trial_line(outcome: TrialOutcome, done: int, total: int, best: FrozenTrial | None) -> str:
    tag = f" [{outcome.reference}]" if outcome.reference else ""
    best_txt = f"best {best.user_attrs['val_acc']:.4f} (#{best.number})" if best else "best -"
    line = (
        f"[{done:>{len(str(total))}}/{total}] trial {outcome.number:>3} {outcome.state:<10} "
        f"val_acc {_fmt(outcome.val_acc, '.4f'):>6}  latency {_fmt(outcome.latency_ms, '.3f'):>7} ms  "
        f"{human_count(outcome.params):>6} params  {outcome.seconds:6.1f}s  {best_txt}{tag}"
    )
    if outcome.reason:
        line += f"\n      reason: {outcome.reason}"
    return line


def summary_table(trials: Sequence[FrozenTrial], limit: int = 5) -> str:
    rows = [f"{'trial':>5}  {'val_acc':>7}  {'latency_ms':>10}  {'params':>7}  {'MFLOPs':>7}  arch"]
    for t in trials[:limit]:
        ua = t.user_attrs
        name = f" ({ua['reference']})" if ua.get("reference") else ""
        rows.append(
            f"{t.number:>5}  {ua['val_acc']:>7.4f}  {ua['latency_ms']:>10.3f}  {human_count(ua['params']):>7}  "
            f"{ua['flops'] / 1e6:>7.1f}  {ua['arch']}{name}"
        )
    return "\n".join(rows)


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {"complete": 0, "infeasible": 0, "pruned": 0, "failed": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif t.state == TrialState.FAIL:
            counts["failed"] += 1
        elif t.state == TrialState.COMPLETE:
            counts["infeasible" if t.user_attrs.get("state") == "infeasible" else "complete"] += 1
    return counts
