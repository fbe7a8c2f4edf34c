"""Candidates over the latency budget refused inside the sampler, before they become trials.

Under a tight budget most draws are over it (at the 1st percentile of a space's latencies, about 100
draws per trained network). Kept as trials, every draw makes the next one dearer: TPE splits and fits
every trial the study holds, per parameter group, and every trial costs storage writes and reads; a
tight-budget ``trials=200`` would hold ~20,000 trials and spend hours in the sampler. The screen draws
a whole candidate from the configured sampler (its relative sample, then its own independent draws
for the rest, in the order the search asks), judges its latency with the search's estimator (a table
predicts in microseconds) and draws again while it is over the budget. Only networks that will train
become trials, so the sampler's cost follows the trained networks, not the draws. When ``attempts``
draws in a row are over, the fastest of them becomes a trial over the budget as before (the sampler
still sees where the budget lies, the nearest miss telling it most); past the sampler's start-up, each
further trial kept over the budget in a row may draw twice as many as the one before, so a long run of
misses adds a trial per doubling;
``search.max_draws_over_budget`` draws over it in a row still end a hopeless search.

Optuna asks a sampler for a trial's relative search space and then for its relative sample, once,
at the trial's first suggestion; the screen drafts there, returns the accepted candidate's
distributions as the relative search space and its values as the relative sample, so every
suggestion of the trial takes the drafted value. While it drafts, the sampler sees the study through
:class:`DraftStudy`: the trials read once per trial, and what the sampler writes to the trial (TPE's
constant liar, NSGA-II's generation) held back and written once, for the kept candidate only. A
refused draw costs no storage read or write.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from nas.latency.estimator import CHANGED_ATTR, MEASURED_ATTR
from nas.space import Arch
from nas.trial_states import REFUSED_ATTR

__all__ = ["REFUSED_ATTR", "BudgetScreen", "Draft", "DraftTrial", "Refusals"]


@dataclass
class Refusals:
    """The draws refused before one trial: how many, the fastest (how near the budget the sampler got) and
    one drawn uniformly among them (what the sampler was drawing), each as (latency_ms, arch)."""

    count: int = 0
    fastest: tuple[float, str] | None = None
    sample: tuple[float, str] | None = None
    measured: int = 0  # near the budget, measured on the target before they were judged (latency.verify_band)
    changed: int = 0  # of those, refused because the measurement said over where the table said within

    @classmethod
    def of(cls, drafts: Sequence[Draft], rng: random.Random) -> Refusals:
        if not drafts:
            return cls()
        pairs = [(d.latency_ms, d.arch) for d in drafts]
        measured = sum(MEASURED_ATTR in d.details for d in drafts)
        changed = sum(bool(d.details.get(CHANGED_ATTR)) for d in drafts)
        return cls(len(pairs), min(pairs), rng.choice(pairs), measured, changed)

    def record(self) -> dict[str, Any]:
        """What the trial keeps (JSON: a user attribute of the study's storage)."""
        assert self.fastest is not None and self.sample is not None
        return {"count": self.count, "fastest_ms": self.fastest[0], "fastest_arch": self.fastest[1],
                "sample_ms": self.sample[0], "sample_arch": self.sample[1], "measured": self.measured,
                "changed": self.changed}  # fmt: skip


@dataclass
class Draft:
    """The candidate a trial will suggest, already judged: the trial reuses the latency instead of asking the
    estimator again (a measurement, for latency.estimator=measure or a draw inside latency.verify_band)."""

    arch: str
    latency_ms: float
    details: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    refused: Refusals = field(default_factory=Refusals)
    writes: dict[str, Any] = field(default_factory=dict)  # what the sampler wrote to the trial drafting it


class DraftTrial:
    """The suggest methods the search's draw calls (``Space.sample``, ``sample_hparams``), answered by ``pick``
    and recorded, so that a whole candidate is drawn and judged without an Optuna trial."""

    def __init__(self, pick: Callable[[str, BaseDistribution], Any]) -> None:
        self._pick = pick
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}

    def _suggest(self, name: str, distribution: BaseDistribution) -> Any:
        if name not in self.params:
            self.params[name], self.distributions[name] = self._pick(name, distribution), distribution
        return self.params[name]

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._suggest(name, CategoricalDistribution(list(choices)))

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return self._suggest(name, FloatDistribution(low, high, step=step, log=log))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._suggest(name, IntDistribution(low, high, step=step, log=log))


class HeldWrites:
    """The study's storage, but the drafting trial's system attributes are held (``held``), not written."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        self._storage, self._trial_id = storage, trial_id
        self.held: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id == self._trial_id:
            self.held[key] = value
        else:
            self._storage.set_trial_system_attr(trial_id, key, value)


class DraftStudy:
    """The study as the inner sampler sees it during one trial's drafting: its trials read once (samplers
    read them per call and per parameter group, TPE's constant liar past Optuna's per-trial cache), the
    drafting trial's writes held. Everything else is the study's own."""

    def __init__(self, study: Study, trial: FrozenTrial) -> None:
        self._study = study
        self._trials = study._get_trials(deepcopy=False, use_cache=False)
        self._storage = HeldWrites(study._storage, trial._trial_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


def is_queued(trial: FrozenTrial) -> bool:
    """Enqueued (a yardstick, queued work given back, a heartbeat retry): its parameters are fixed, not drawn."""
    return "fixed_params" in trial.system_attrs


class BudgetScreen(BaseSampler):
    """Wraps the study's sampler; see the module's docstring. ``draw`` is the search's candidate draw (the
    architecture and the searched hyperparameters from one trial-like source), ``judge`` its latency estimate
    (figure and what it was made of), ``over_budget`` the objective's rule."""

    def __init__(
        self,
        inner: BaseSampler,
        draw: Callable[[Any], Arch],
        judge: Callable[[Arch], tuple[float, dict[str, Any]]],
        over_budget: Callable[[float], bool],
        attempts: int,
        limit: int = 0,
        seed: int = 0,
        steady: int = 10,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.inner, self.draw, self.judge, self.over_budget = inner, draw, judge, over_budget
        self.attempts, self.limit, self.steady = attempts, limit, steady
        self._rng = random.Random(seed)
        self._drafts: dict[int, Draft] = {}
        self._kept_over = 0  # trials kept over the budget in a row (each after refusing all its draws)
        self._streak = 0  # draws over the budget in a row, refused or kept

    def attempts_now(self) -> int:
        """Draws the next trial may make: ``attempts`` for the first ``steady`` trials kept over the budget in a
        row (the sampler's start-up: its model needs trials, and with nothing within the budget yet, the misses
        nearest it are what guides it there), then twice as many for each further one, so a long run of misses
        adds a trial per doubling rather than per ``attempts`` draws (each trial makes every later draw dearer);
        never past ``limit`` draws over the budget in a row (search.max_draws_over_budget)."""
        n = self.attempts * 2 ** min(max(0, self._kept_over - self.steady + 1), 30)
        return max(1, min(n, self.limit - self._streak)) if self.limit > 0 else n

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        space = self.inner.infer_relative_search_space(study, trial)
        if is_queued(trial):
            return space
        draft = self._draft(study, trial, space)
        self._drafts[trial.number] = draft
        return {**space, **draft.distributions}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        draft = self._drafts.get(trial.number)
        if draft is None:
            return self.inner.sample_relative(study, trial, search_space)
        return dict(draft.params)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def take(self, number: int) -> Draft | None:
        """The judged candidate of trial ``number`` (once: the screen keeps no trial's draft after it)."""
        return self._drafts.pop(number, None)

    def _draft(self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]) -> Draft:
        """Draw until a candidate is within the budget; after ``attempts`` over it, keep the fastest of them
        (the one nearest the budget tells the sampler most about where the feasible region lies)."""
        view, refused, attempts = DraftStudy(study, trial), [], self.attempts_now()
        seen: Study = view  # type: ignore[assignment]  # what a sampler uses of a Study, DraftStudy has
        while True:
            view._storage.held = {}
            relative = self.inner.sample_relative(seen, trial, space)
            source = DraftTrial(self._picker(seen, trial, space, relative))
            arch = self.draw(source)
            latency, details = self.judge(arch)
            draft = Draft(arch.encode(), latency, details, source.params, source.distributions,
                          writes=view._storage.held)  # fmt: skip
            if not self.over_budget(latency):
                break
            refused.append(draft)
            if len(refused) >= attempts:
                draft = min(refused, key=lambda d: d.latency_ms)
                refused.remove(draft)
                break
        draft.refused = Refusals.of(refused, self._rng)
        over = self.over_budget(draft.latency_ms)
        self._kept_over, self._streak = (self._kept_over + 1, self._streak + attempts) if over else (0, 0)
        for key, value in draft.writes.items():
            study._storage.set_trial_system_attr(trial._trial_id, key, value)
        return draft

    def _picker(
        self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution], relative: dict[str, Any]
    ) -> Callable[[str, BaseDistribution], Any]:
        """What Optuna's trial would do for a suggestion: the relative sample's value, else an independent draw."""

        def pick(name: str, distribution: BaseDistribution) -> Any:
            if name in relative and space.get(name) == distribution:
                return relative[name]
            return self.inner.sample_independent(study, trial, name, distribution)

        return pick

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._drafts.pop(trial.number, None)  # a trial that failed before it took its draft
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
        self._rng = random.Random()
