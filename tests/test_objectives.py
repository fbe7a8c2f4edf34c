"""One object per search.objective: directions, values, budgets and rankings that search, charts and retrain share."""

from __future__ import annotations

import optuna
import pytest

from nas.errors import NasError
from nas.objectives import MnasObjective, ParetoObjective, StudyObjective, make_objective, objective_of
from nas.retrain.select import from_study
from nas.search.runner import run_search
from tests.conftest import FAST, TINY_ARCH, compose_cfg

ARCHS = [TINY_ARCH.replace("w0.5", w) for w in ("w0.25", "w0.5", "w1")]


def test_objectives_by_name_and_their_settings():
    assert type(make_objective("accuracy", None)) is StudyObjective
    assert make_objective("pareto", 2.0).directions == ("maximize", "minimize")
    mnas = make_objective("mnas", 2.0, -0.1)
    assert isinstance(mnas, MnasObjective) and not mnas.hard_budget and not mnas.is_over_budget(100.0)
    assert mnas.value(0.8, 4.0) == pytest.approx(0.8 * 2.0**-0.1)
    assert mnas.settings() == {"objective": "mnas", "budget_ms": 2.0, "search.mnas_exponent": -0.1}
    with pytest.raises(NasError, match=r"search\.objective=mnas needs a latency target"):
        make_objective("mnas", None)
    with pytest.raises(NasError, match=r"search\.objective='speed' is not one of accuracy, mnas, pareto"):
        make_objective("speed", None)
    with pytest.raises(NasError, match=r"latency\.budget_ms=-1 must be a positive number"):
        make_objective("accuracy", -1)


def _study(directions: list[str], identity: dict) -> optuna.Study:
    study = optuna.create_study(directions=directions)
    study.set_user_attr("identity", identity)
    return study


def _add(study: optuna.Study, acc: float, lat: float, arch: str, goal) -> None:
    study.add_trial(
        optuna.trial.create_trial(
            values=list(v) if isinstance(v := goal.value(acc, lat), tuple) else [v],
            user_attrs={"state": "complete", "val_acc": acc, "latency_ms": lat, "arch": arch, "params": 1, "flops": 1},
        )
    )


def test_mnas_ranks_by_its_objective_everywhere():
    """A slower, slightly more accurate network loses under MnasNet's objective: the best trial,
    the ranking and nas.retrain select=best agree on that."""
    identity = make_objective("mnas", 1.0, -0.5).settings()  # what a study stores
    study = _study(["maximize"], identity)
    goal = objective_of(study)
    assert isinstance(goal, MnasObjective) and goal.exponent == -0.5
    _add(study, 0.80, 1.0, ARCHS[0], goal)  # objective 0.80
    _add(study, 0.85, 4.0, ARCHS[1], goal)  # objective 0.425: more accurate, far slower
    assert [t.user_attrs["val_acc"] for t in goal.ranked(study)] == [0.80, 0.85]
    assert study.best_trial.number == goal.ranked(study)[0].number
    assert from_study(study, "best", None, []).trial == 0


def test_studies_from_before_pareto_read_as_pareto():
    study = _study(["maximize", "minimize"], {"objective": "accuracy", "budget_ms": 2.0})
    goal = objective_of(study)
    assert isinstance(goal, ParetoObjective) and goal.budget_ms == 2.0


def test_mnas_search_trains_every_draw_and_records_no_constraint(in_tmp, tiny_space, capsys):
    target = 0.01  # below every network: a hard budget would refuse them all, a soft target trains them all
    cfg = compose_cfg(
        f"+space={tiny_space}", *FAST, "trials=3", "search.objective=mnas", f"latency.budget_ms={target}",
        "search.mnas_exponent=-0.15",
    )  # fmt: skip
    result = run_search(cfg)
    assert result.exit_code == 0
    goal = objective_of(result.study)  # read back from the stored study, as report and retrain do
    assert isinstance(goal, MnasObjective) and (goal.budget_ms, goal.exponent) == (target, -0.15)
    trials = result.study.trials
    assert [t.user_attrs["state"] for t in trials] == ["complete"] * 3
    for t in trials:
        assert t.constraints == {}  # nothing for TPE, best_trial or the plots to treat as infeasible
        expected = t.user_attrs["val_acc"] * (t.user_attrs["latency_ms"] / target) ** -0.15
        assert t.value == pytest.approx(expected)
        assert t.intermediate_values[0] == pytest.approx(expected)  # the pruner compares objective values
    assert result.study.best_trial.number == goal.ranked(result.study)[0].number
    out = capsys.readouterr().out
    assert "best trials (accuracy x (latency / 0.01 ms)^-0.15)" in out and "objective" in out
