"""Which architecture to retrain: a study's finalist winner or best trial, a Pareto point, an MLflow trial run,
or a string."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from nas import trial_states
from nas.errors import NasError
from nas.objectives import ParetoObjective, objective_of
from nas.space import Arch, decode
from nas.studies import finalist_round


@dataclass
class Selection:
    arch: Arch
    hparams: dict[str, Any] = field(default_factory=dict)  # sampled config keys of the source trial
    study: str | None = None
    trial: int | None = None
    run_id: str | None = None
    how: str = "arch"
    identity: dict[str, Any] = field(default_factory=dict)  # the source study's setup, when known
    note: str | None = None  # something the user should know about the choice
    epoch_seconds: float | None = None  # the source trial's training time per epoch (the retrain's pace estimate)

    def describe(self) -> str:
        if self.study and self.trial is not None:
            won = " (the finalist round's winner)" if self.how == "finalist" else ""
            return f"trial {self.trial} of study {self.study}{won}"
        return f"MLflow run {self.run_id}" if self.run_id else "the given architecture"


def _hparams(trial: FrozenTrial, keys: list[str]) -> dict[str, Any]:
    return {k: v for k, v in trial.params.items() if k in keys}


def _finalist_winner(study: optuna.Study) -> tuple[FrozenTrial | None, str | None]:
    """The finalist round's winner, and a note when the study has trained more networks since the round. A
    round that measured its finalists and found every one over the budget has no network to offer: refused
    (the search's best is one of them), naming what to do."""
    record = finalist_round(study)
    if not record:
        return None, None
    if record.get("winner") is None:
        measured = [c for c in record.get("candidates") or [] if c.get("measured_ms") is not None]
        if measured and all(c.get("over_budget") for c in measured):
            figures = ", ".join(f"{c.get('reference') or 'trial ' + str(c['trial'])} {c['measured_ms']:.3f} ms"
                                for c in measured)  # fmt: skip
            budget = (study.user_attrs.get("identity") or {}).get("budget_ms")
            raise NasError(
                f"the finalist round of study {study.study_name!r} measured every finalist over the {budget} ms "
                f"budget ({figures}): no network within the budget to retrain. Rerun the search with more "
                f"finalists (search.finalists={int(record.get('finalists') or len(measured)) + 3}) to measure more of "
                "its networks, or take the "
                "search's best anyway with select=search (its alias stays put if it measures over the budget)"
            )
        why = record.get("no_winner_reason") or "no finalist run finished"
        return None, f"{why} in the study's finalist round: the search's best is taken instead"
    chosen = study.trials[int(record["winner"])]
    trained = trial_states.count_trained(study)
    note = None
    if trained > int(record.get("trained", trained)):
        note = (
            f"the finalist round ran when {record['trained']} networks were trained, the study has {trained} now: "
            "rerun the search command to bring the round up to date (select=search takes the search's best)"
        )
    return chosen, note


def from_study(study: optuna.Study, select: str, budget_ms: float | None, hparam_keys: list[str]) -> Selection:
    """``best``: the finalist round's winner where the study had one, else the best trial by the study's own
    objective (for a Pareto study the most accurate feasible point, within ``budget_ms`` when given);
    ``search``: that best trial even when a round ran; ``pareto:N``: the N-th Pareto point by latency."""
    goal = objective_of(study)
    ranked = goal.ranked(study)
    if not ranked:
        raise NasError(f"study {study.study_name!r} has no finished feasible trial to retrain")
    note = None
    if select.startswith("pareto:"):
        if not isinstance(goal, ParetoObjective):
            raise NasError("select=pareto:N needs a Pareto study (search.objective=pareto); use select=best")
        front = goal.front(study)
        index = int(select.split(":", 1)[1])
        if not 0 <= index < len(front):
            raise NasError(f"select={select}: the Pareto front of {study.study_name!r} has {len(front)} points (0..)")
        chosen, how = front[index], select
    elif select in ("best", "search"):
        winner, note = _finalist_winner(study) if select == "best" else (None, None)
        pool = ranked
        if isinstance(goal, ParetoObjective) and budget_ms is not None:
            pool = [t for t in ranked if t.user_attrs["latency_ms"] <= budget_ms] or ranked
        chosen, how = (winner, "finalist") if winner is not None else (pool[0], select)
    else:
        raise NasError(f"select={select!r} is not 'best', 'search' or 'pareto:N'")
    return Selection(
        arch=decode(chosen.user_attrs["arch"]),
        hparams=_hparams(chosen, hparam_keys),
        study=study.study_name,
        trial=chosen.number,
        how=how,
        note=note,
        epoch_seconds=trial_states.epoch_seconds(chosen),
    )


def get_trial_run(client: MlflowClient, run_id: str) -> Run:
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise NasError(f"MLflow run {run_id} not found: {str(exc).splitlines()[0]}") from None
    if "arch" not in run.data.params:
        raise NasError(f"MLflow run {run_id} has no 'arch' param; pass the run of a search trial")
    return run


def from_run(client: MlflowClient, run_id: str, hparam_keys: list[str]) -> Selection:
    run = get_trial_run(client, run_id)
    params = run.data.params
    hparams = {k: _parse(params[k]) for k in hparam_keys if k in params}
    trial = run.data.tags.get("optuna.trial_number")
    return Selection(
        arch=decode(params["arch"]),
        hparams=hparams,
        study=run.data.tags.get("nas.study"),
        trial=int(trial) if trial is not None else None,
        run_id=run_id,
        how="run_id",
    )


def _parse(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)
