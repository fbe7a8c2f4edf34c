"""The sampler's budget screen: draws over the budget are refused before they become trials, with any sampler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
import pytest

from nas.search.hparams import sample_hparams
from nas.search.screen import BudgetScreen, Refusals
from nas.space import Arch, load_space

HPARAMS = {"train.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.4, "log": True}}
ATTEMPTS = 50
STEADY = 2  # trials kept over the budget in a row before the next one may draw twice as many


def synthetic_latency(arch: Arch) -> float:
    """A latency that grows with the network (no measurement: the screen's logic is what is tested)."""
    return arch.resolution / 32 * arch.width * sum(b.kernel * b.expansion for b in arch.blocks)


def make_screen(space_file, inner: optuna.samplers.BaseSampler, budget: float) -> BudgetScreen:
    space = load_space(space_file)

    def draw(source: Any) -> Arch:
        arch = space.sample(source)
        sample_hparams(source, HPARAMS)
        return arch

    judge = lambda a: (synthetic_latency(a), {})  # noqa: E731
    return BudgetScreen(inner, draw, judge, lambda ms: ms > budget, ATTEMPTS, seed=0, steady=STEADY)


def budget_at(space_file, quantile: float) -> float:
    space = load_space(space_file)
    latencies = sorted(synthetic_latency(space.sample(seed)) for seed in range(400))
    return latencies[int(quantile * len(latencies))]


def run(study: optuna.Study, screen: BudgetScreen, space_file, trials: int, seen: list | None = None) -> None:
    """The search objective's part that matters here: the trial suggests the candidate, takes its draft."""
    space = load_space(space_file)

    def objective(trial: optuna.Trial) -> float:
        arch = space.sample(trial)
        sample_hparams(trial, HPARAMS)
        draft = screen.take(trial.number)
        assert draft is not None and draft.arch == arch.encode()  # the trial holds what the screen judged
        trial.set_user_attr("refused", draft.refused.count)
        trial.set_user_attr("latency", draft.latency_ms)
        trial.set_constraint("over", draft.latency_ms - budget_of(study))
        if seen is not None:
            seen.append(draft)
        return -draft.latency_ms

    study.optimize(objective, n_trials=trials)


def budget_of(study: optuna.Study) -> float:
    return study.user_attrs["budget"]


SAMPLERS: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
    "tpe": lambda: optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, n_startup_trials=3, seed=0
    ),
    "random": lambda: optuna.samplers.RandomSampler(seed=0),
    "nsga2": lambda: optuna.samplers.NSGAIISampler(population_size=4, seed=0),
    "gp": lambda: optuna.samplers.GPSampler(n_startup_trials=3, seed=0, warn_independent_sampling=False),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_over_budget_candidates_never_become_trials(tiny_space, name):
    budget = budget_at(tiny_space, 0.1)
    screen = make_screen(tiny_space, SAMPLERS[name](), budget)
    study = optuna.create_study(direction="maximize", sampler=screen)
    study.set_user_attr("budget", budget)
    run(study, screen, tiny_space, 8 if name == "gp" else 12)
    space = load_space(tiny_space)
    for t in study.trials:
        latency = synthetic_latency(space.sample(optuna.trial.FixedTrial(t.params)))
        assert latency == t.user_attrs["latency"]
        # Within the budget, unless every one of its draws was over it (then kept as a trial over the budget,
        # after ATTEMPTS draws, or twice as many as the trial before when that one was kept over it too).
        drawn = t.user_attrs["refused"] + 1
        assert latency <= budget or (drawn % ATTEMPTS == 0 and (drawn // ATTEMPTS).bit_count() == 1)
    assert sum(t.user_attrs["refused"] for t in study.trials) > 0  # a 10th-percentile budget refuses draws
    assert study.sampler is screen and screen.inner is not None


def test_per_trial_storage_reads_do_not_grow_with_the_draws_refused(tiny_space, monkeypatch):
    """The sampler reads the study's trials the same number of times per trial, however many draws the screen
    makes in it (TPE with the constant liar reads them per parameter group and per draw without the screen's
    DraftStudy), and writes to it the same: a refused draw costs no storage read or write."""
    budget = budget_at(tiny_space, 0.05)
    screen = make_screen(tiny_space, SAMPLERS["tpe"](), budget)
    study = optuna.create_study(direction="maximize", sampler=screen)
    study.set_user_attr("budget", budget)
    reads: list[int] = [0]  # before the first trial; then one count per trial
    writes: list[int] = [0]
    get_all = optuna.storages.InMemoryStorage.get_all_trials
    set_attr = optuna.storages.InMemoryStorage.set_trial_system_attr

    def counted(self, *args, **kwargs):
        reads[-1] += 1
        return get_all(self, *args, **kwargs)

    def counted_write(self, *args, **kwargs):
        writes[-1] += 1
        return set_attr(self, *args, **kwargs)

    monkeypatch.setattr(optuna.storages.InMemoryStorage, "get_all_trials", counted)
    monkeypatch.setattr(optuna.storages.InMemoryStorage, "set_trial_system_attr", counted_write)
    create = study._storage.create_new_trial

    def new_trial(*args, **kwargs):
        reads.append(0)
        writes.append(0)
        return create(*args, **kwargs)

    monkeypatch.setattr(study._storage, "create_new_trial", new_trial)
    run(study, screen, tiny_space, 12)
    refused = [t.user_attrs["refused"] for t in study.trials]
    assert len(study.trials) == 12 and max(refused) >= 5 and min(refused) == 0
    # reads[k]: from trial k's creation to the next one's (the last also holds the loop's end): the same for
    # a trial that refused nothing and one that refused dozens of draws.
    assert len(set(reads[1:-1])) == 1, (reads, refused)
    assert len(set(writes[4:-1])) == 1, (writes, refused)  # past TPE's start-up: its constant-liar record, once


def test_a_trial_that_found_nothing_within_the_budget_keeps_the_fastest_draw(tiny_space):
    budget = -1.0  # nothing fits
    screen = make_screen(tiny_space, optuna.samplers.RandomSampler(seed=1), budget)
    study = optuna.create_study(direction="maximize", sampler=screen)
    study.set_user_attr("budget", budget)
    seen: list = []
    run(study, screen, tiny_space, 4, seen)
    # Past the first STEADY trials kept over the budget, each doubles the next one's draws: a run of misses adds
    # a trial per doubling.
    assert [d.refused.count for d in seen] == [ATTEMPTS - 1, ATTEMPTS - 1, 2 * ATTEMPTS - 1, 4 * ATTEMPTS - 1]
    for draft in seen:
        assert draft.latency_ms <= draft.refused.fastest[0] <= draft.refused.sample[0]


def test_the_draws_in_a_row_never_pass_the_search_limit_and_a_trial_within_the_budget_resets_them(tiny_space):
    random_sampler = optuna.samplers.RandomSampler(seed=0)
    screen = BudgetScreen(random_sampler, lambda s: None, lambda a: (0.0, {}), bool, 10, 35, steady=1)
    assert screen.attempts_now() == 10
    screen._kept_over, screen._streak = 1, 10
    assert screen.attempts_now() == 20
    screen._kept_over, screen._streak = 2, 30
    assert screen.attempts_now() == 5  # 35 in a row at most: the search gives up there
    unlimited = BudgetScreen(random_sampler, lambda s: None, lambda a: (0.0, {}), bool, 10, steady=3)
    unlimited._kept_over = 2
    assert unlimited.attempts_now() == 10  # the start-up's trials: draws_per_trial each
    unlimited._kept_over = 5
    assert unlimited.attempts_now() == 80
    # A trial within the budget after a run of misses: the next one starts from draws_per_trial again.
    budget = budget_at(tiny_space, 0.5)
    real = make_screen(tiny_space, optuna.samplers.RandomSampler(seed=0), budget)
    real._kept_over, real._streak = 4, 500
    study = optuna.create_study(direction="maximize", sampler=real)
    study.set_user_attr("budget", budget)
    run(study, real, tiny_space, 1)
    assert study.trials[0].user_attrs["latency"] <= budget and real.attempts_now() == ATTEMPTS


def test_queued_trials_are_not_drafted_and_old_studies_resume(tiny_space):
    """A yardstick or a retry (fixed parameters) is trained as queued; a study whose earlier draws were trials
    over the budget (search.draws_per_trial=1) goes on with the screen."""
    space = load_space(tiny_space)
    budget = budget_at(tiny_space, 0.2)
    study = optuna.create_study(direction="maximize", sampler=SAMPLERS["tpe"]())
    study.set_user_attr("budget", budget)

    def old_loop(trial: optuna.Trial) -> float:  # every draw a trial, the constraint told
        latency = synthetic_latency(space.sample(trial))
        sample_hparams(trial, HPARAMS)
        trial.set_constraint("over", latency - budget)
        return 0.0

    study.optimize(old_loop, n_trials=10)
    fixed = dict(study.trials[0].params)
    study.enqueue_trial(fixed)
    screen = make_screen(tiny_space, study.sampler, budget)
    study.sampler = screen
    queued_latency: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        arch = space.sample(trial)
        sample_hparams(trial, HPARAMS)
        draft = screen.take(trial.number)
        if trial.number == 10:
            assert draft is None and trial.params == fixed  # queued: not drafted, its own parameters
            queued_latency.append(synthetic_latency(arch))
            return 0.0
        assert draft is not None and draft.arch == arch.encode()
        trial.set_constraint("over", draft.latency_ms - budget)
        return -draft.latency_ms

    study.optimize(objective, n_trials=6)
    assert queued_latency
    later = [synthetic_latency(space.sample(optuna.trial.FixedTrial(t.params))) for t in study.trials[11:]]
    assert len(later) == 5 and all(latency <= budget for latency in later)


def test_refusals_record_count_fastest_and_a_member():
    import random

    from nas.search.screen import Draft

    drafts = [Draft(f"a{i}", float(ms), {}) for i, ms in enumerate([5, 3, 9])]
    r = Refusals.of(drafts, random.Random(0))
    assert r.count == 3 and r.fastest == (3.0, "a1") and r.sample in [(5.0, "a0"), (3.0, "a1"), (9.0, "a2")]
    assert r.record()["fastest_arch"] == "a1"
    assert Refusals.of([], random.Random(0)).count == 0
