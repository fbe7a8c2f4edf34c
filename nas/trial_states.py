"""What each trial of a study is: a trained network, a draw over the latency budget, or a failure.

One classification for everyone who reads a study (the search's counting, its summary, the
charts, ``nas.report`` and ``nas.retrain``): ``trials=N`` counts *trained* networks, so the
definition has to be the same wherever trials are counted or ranked.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

COMPLETE = "complete"  # trained to the last epoch
PRUNED = "pruned"  # trained, stopped early by the pruner
OVER_BUDGET = "infeasible"  # a draw over latency.budget_ms: never trained (the stored name predates the term)
FAILED = "failed"
SURPLUS = "surplus"  # another worker already trains the study's last network; nothing ran
REFUSED_ATTR = "refused_draws"  # nas.search.screen: draws refused before a trial, kept on the trial
STALE = "stale"  # a queued finalist run dropped before training: a rerun's round no longer holds it
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def epoch_seconds(trial: FrozenTrial) -> float | None:
    """Seconds per epoch the trial trained at (Lightning's timer over its epochs), if it recorded them: the pace
    a retrain of its network is estimated at."""
    seconds, epochs = (trial.user_attrs.get("time_s") or {}).get("epochs"), trial.user_attrs.get("epochs")
    return float(seconds) / int(epochs) if seconds and epochs else None


def state(trial: FrozenTrial) -> str:
    """The trial's outcome; Optuna's own state where ours was never written (e.g. a killed process)."""
    if trial.state == TrialState.PRUNED:
        return PRUNED
    if trial.state == TrialState.FAIL:
        return SURPLUS if trial.user_attrs.get("state") == SURPLUS else FAILED
    if trial.state == TrialState.COMPLETE:
        return OVER_BUDGET if trial.user_attrs.get("state") == OVER_BUDGET else COMPLETE
    return trial.state.name.lower()


def is_trained(trial: FrozenTrial) -> bool:
    return state(trial) in (COMPLETE, PRUNED)


def trained(study: optuna.Study) -> list[FrozenTrial]:
    """Networks that were trained (to the end or until pruned): what ``trials=N`` counts."""
    return [t for t in study.get_trials(deepcopy=False, states=FINISHED_STATES) if is_trained(t)]


def count_trained(study: optuna.Study) -> int:
    return len(trained(study))


def complete(study: optuna.Study) -> list[FrozenTrial]:
    """Trained to the last epoch: the trials whose accuracy can be compared and ranked."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if state(t) == COMPLETE]


def over_budget(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if state(t) == OVER_BUDGET]


def refusals(study: optuna.Study) -> list[tuple[int, dict]]:
    """(trial number, record) of every trial that the sampler's screen refused draws before: their count,
    the fastest and a random one (``nas.search.screen``); the draws themselves never became trials."""
    trials = study.get_trials(deepcopy=False)
    return [(t.number, t.user_attrs[REFUSED_ATTR]) for t in trials if REFUSED_ATTR in t.user_attrs]


def counts(study: optuna.Study) -> dict[str, int]:
    """Outcomes, for progress lines, the summary and the study run's metrics: trials per state, and as
    ``OVER_BUDGET`` every draw over the budget (the trials recorded over it and the draws refused before
    a trial)."""
    out = {COMPLETE: 0, PRUNED: 0, OVER_BUDGET: 0, FAILED: 0}
    for t in study.get_trials(deepcopy=False):
        out[OVER_BUDGET] += int((t.user_attrs.get(REFUSED_ATTR) or {}).get("count", 0))
        s = state(t)
        if s in out:
            out[s] += 1
    return out
