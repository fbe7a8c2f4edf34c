"""What a study optimises: one small object per ``search.objective``.

Everything that differs between objectives lives here, not in branches on a sampler's name:
the study's directions, whether trials can be pruned, the value told to Optuna, what a draw
over the latency budget returns, and how trained trials rank. The search, its summary, the
charts, ``nas.report`` and ``nas.retrain select=best`` all ask the same object, so "the best
trial" means one thing everywhere. An objective can be rebuilt from a stored study (its
identity), so a study is read the way it was searched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import optuna
from optuna.trial import FrozenTrial

from nas import trial_states
from nas.errors import NasError

Value = float | tuple[float, float]
EXPONENT_KEY = "search.mnas_exponent"  # in a study's identity, as in the configuration


@dataclass(frozen=True)
class StudyObjective:
    """Maximise validation accuracy; a draw over ``budget_ms`` is not trained (hard constraint)."""

    name: ClassVar[str] = "accuracy"
    directions: ClassVar[tuple[str, ...]] = ("maximize",)
    can_prune: ClassVar[bool] = True
    score_is_accuracy: ClassVar[bool] = True  # whether ranking by score is ranking by val_acc
    budget_ms: float | None = None

    @property
    def hard_budget(self) -> bool:
        """Whether draws over the budget are refused (and the constraint recorded for the sampler)."""
        return self.budget_ms is not None

    def is_over_budget(self, latency_ms: float) -> bool:
        return self.hard_budget and latency_ms > float(self.budget_ms)  # type: ignore[arg-type]

    def score(self, val_acc: float, latency_ms: float) -> float:
        """One number, higher is better: what pruning compares and the summary ranks by."""
        return val_acc

    def value(self, val_acc: float, latency_ms: float) -> Value:
        return self.score(val_acc, latency_ms)

    def over_budget_value(self, latency_ms: float) -> Value:
        """Told to Optuna for an untrained draw; the recorded constraint is what marks it infeasible."""
        return 0.0

    def trial_score(self, trial: FrozenTrial) -> float:
        return self.score(float(trial.user_attrs["val_acc"]), float(trial.user_attrs["latency_ms"]))

    def feasible(self, trial: FrozenTrial) -> bool:
        """Within the budget, by this objective and by the constraint the trial recorded."""
        recorded = all(v <= 0 for v in (trial.constraints or {}).values())
        return recorded and not self.is_over_budget(float(trial.user_attrs["latency_ms"]))

    def ranked(self, study: optuna.Study) -> list[FrozenTrial]:
        """Networks trained to the end, within the budget where it is hard, best first."""
        pool = [t for t in trial_states.complete(study) if self.feasible(t)]
        return sorted(pool, key=lambda t: (-self.trial_score(t), t.number))

    def settings(self) -> dict[str, Any]:
        """What the objective adds to a study's identity (resuming with other settings is refused)."""
        return {"objective": self.name, "budget_ms": self.budget_ms}

    def describe(self) -> str:
        return "validation accuracy" + (f" within {self.budget_ms} ms" if self.hard_budget else "")


@dataclass(frozen=True)
class MnasObjective(StudyObjective):
    """MnasNet's soft objective: accuracy x (latency / target)^w. Every draw is trained; none is refused."""

    name: ClassVar[str] = "mnas"
    score_is_accuracy: ClassVar[bool] = False
    exponent: float = -0.07

    @property
    def hard_budget(self) -> bool:
        return False

    def score(self, val_acc: float, latency_ms: float) -> float:
        return val_acc * (latency_ms / float(self.budget_ms)) ** self.exponent  # type: ignore[arg-type]

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), EXPONENT_KEY: self.exponent}

    def describe(self) -> str:
        return f"accuracy x (latency / {self.budget_ms} ms)^{self.exponent}"


@dataclass(frozen=True)
class ParetoObjective(StudyObjective):
    """Accuracy and latency as two objectives (a Pareto front); Optuna cannot prune such trials."""

    name: ClassVar[str] = "pareto"
    directions: ClassVar[tuple[str, ...]] = ("maximize", "minimize")
    can_prune: ClassVar[bool] = False

    def value(self, val_acc: float, latency_ms: float) -> Value:
        return (val_acc, latency_ms)

    def over_budget_value(self, latency_ms: float) -> Value:
        return (0.0, latency_ms)

    def front(self, study: optuna.Study) -> list[FrozenTrial]:
        """The trained, feasible Pareto front, fastest first."""
        ids = {t.number for t in self.ranked(study)}
        return sorted((t for t in study.best_trials if t.number in ids), key=lambda t: t.user_attrs["latency_ms"])

    def describe(self) -> str:
        return "accuracy vs latency (Pareto front)" + (f" within {self.budget_ms} ms" if self.hard_budget else "")


OBJECTIVES: dict[str, type[StudyObjective]] = {o.name: o for o in (StudyObjective, MnasObjective, ParetoObjective)}


def make_objective(name: str, budget_ms: float | None, mnas_exponent: float = -0.07) -> StudyObjective:
    """The objective named by ``search.objective``, checked against the budget it needs."""
    if name not in OBJECTIVES:
        raise NasError(f"search.objective={name!r} is not one of {', '.join(OBJECTIVES)}")
    if budget_ms is not None and not (isinstance(budget_ms, int | float) and budget_ms > 0):
        raise NasError(f"latency.budget_ms={budget_ms!r} must be a positive number of milliseconds (or null)")
    if name == MnasObjective.name:
        if budget_ms is None:
            raise NasError("search.objective=mnas needs a latency target: set latency.budget_ms")
        return MnasObjective(budget_ms=float(budget_ms), exponent=float(mnas_exponent))
    return OBJECTIVES[name](budget_ms=None if budget_ms is None else float(budget_ms))


def objective_from_cfg(cfg: Any) -> StudyObjective:
    return make_objective(str(cfg.search.objective), cfg.latency.budget_ms, cfg.search.get("mnas_exponent", -0.07))


def objective_of(study: optuna.Study, identity: Mapping[str, Any] | None = None) -> StudyObjective:
    """The objective a stored study was searched with (studies from before ``pareto`` existed: by directions)."""
    stored = identity if identity is not None else study.user_attrs.get("identity", {})
    name = str(stored.get("objective", "accuracy"))
    if len(study.directions) == 2:
        name = ParetoObjective.name
    return make_objective(name, stored.get("budget_ms"), stored.get(EXPONENT_KEY, -0.07))
