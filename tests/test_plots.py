"""Study charts: what each mark means, trained networks only in the importances, files a person can open."""

from __future__ import annotations

import json
import re

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from nas.objectives import make_objective
from nas.tracking.plots import chart_data, grouped_importances, importances, study_plots


def _trial(number_state: str, acc: float | None, lat: float, budget: float, params=None, reference=None, last=None):
    attrs = {"state": number_state, "latency_ms": lat, "arch": "x", "params": 1, "flops": 1}
    if acc is not None:
        attrs["val_acc"] = acc
    if reference:
        attrs["reference"] = reference
    params = params or {}
    dists = {k: FloatDistribution(0.001, 1.0, log=True) if k == "lr" else CategoricalDistribution([0.5, 1.0])
             for k in params}  # fmt: skip
    state = optuna.trial.TrialState.PRUNED if number_state == "pruned" else optuna.trial.TrialState.COMPLETE
    return optuna.trial.create_trial(
        state=state,
        value=None if state == optuna.trial.TrialState.PRUNED else (acc or 0.0),
        params=params,
        distributions=dists,
        user_attrs=attrs,
        intermediate_values={0: last} if last is not None else None,
        constraints={"latency_ms_over_budget": lat - budget},
    )


def _study(budget: float = 2.0) -> optuna.Study:
    study = optuna.create_study(direction="maximize", study_name="charts")
    study.set_user_attr("identity", {"objective": "accuracy", "budget_ms": budget, "latency_device": "CPU X",
                                     "latency_batch": 1})  # fmt: skip
    study.add_trial(_trial("complete", 0.60, 1.0, budget))
    study.add_trial(_trial("complete", 0.70, 1.5, budget))
    study.add_trial(_trial("complete", 0.65, 1.8, budget))  # dominated: slower and less accurate than 0.70
    study.add_trial(_trial("complete", 0.75, 1.9, budget, reference="mobilenet_v3_small"))
    study.add_trial(_trial("pruned", 0.40, 1.2, budget, last=0.40))
    study.add_trial(_trial("infeasible", None, 3.0, budget))
    study.add_trial(_trial("infeasible", None, 2.5, budget, reference="mobilenet_v3_large"))
    return study


def test_chart_data_places_every_trial_by_what_it_is():
    study = _study()
    data = chart_data(study, make_objective("accuracy", 2.0))
    assert sorted((p.latency_ms, p.val_acc) for p in data.complete) == [
        (1.0, 0.6),
        (1.5, 0.7),
        (1.8, 0.65),
        (1.9, 0.75),
    ]
    assert [(p.latency_ms, p.val_acc) for p in data.pruned] == [(1.2, 0.4)]  # at its last epoch's accuracy
    assert sorted(p.latency_ms for p in data.over_budget) == [2.5, 3.0]
    assert all(p.val_acc is None for p in data.over_budget)  # not trained: no accuracy, never 0
    assert [(p.latency_ms, p.val_acc) for p in data.front] == [(1.0, 0.6), (1.5, 0.7), (1.9, 0.75)]
    assert data.budget_ms == 2.0 and data.budget_label == "budget" and "batch 1 on CPU X" in data.x_label
    mnas = chart_data(study, make_objective("mnas", 2.0))
    assert mnas.budget_label == "target"


def test_draws_refused_before_a_trial_are_marked_by_their_fastest_and_a_random_one(tmp_path):
    """They never became trials: the trial after them holds their count and two of them, which the chart shows,
    saying how many draws there were."""
    study = _study()
    trial = _trial("complete", 0.62, 1.1, 2.0)
    trial.user_attrs["refused_draws"] = {"count": 40, "fastest_ms": 2.2, "fastest_arch": "a", "sample_ms": 4.0,
                                         "sample_arch": "b"}  # fmt: skip
    study.add_trial(trial)
    data = chart_data(study, make_objective("accuracy", 2.0))
    assert sorted(p.latency_ms for p in data.over_budget) == [2.2, 2.5, 3.0, 4.0]
    assert data.over_budget_draws == 42
    study_plots(study, tmp_path, make_objective("accuracy", 2.0))
    assert "over budget, not trained (42; 4 shown)" in (tmp_path / "accuracy_vs_latency.html").read_text()


def test_accuracy_latency_files(tmp_path):
    files = study_plots(_study(), tmp_path, make_objective("accuracy", 2.0))
    names = {f.name for f in files}
    assert {"accuracy_vs_latency.png", "accuracy_vs_latency.html", "optimization_history.png"} <= names
    for f in files:
        assert f.stat().st_size > 5_000
    html = (tmp_path / "accuracy_vs_latency.html").read_text()
    figure = json.loads(re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*\{", html, re.S).group(1))
    traces = {t["name"]: t for t in figure}
    over = traces["over budget, not trained (2)"]
    trained_acc = [0.6, 0.7, 0.65, 0.75, 0.4]
    assert over["x"] == [3.0, 2.5] and all(0.3 < y < min(trained_acc) for y in over["y"])  # below, not at 0
    assert traces["pruned, at its last epoch (1)"]["y"] == [0.4]
    assert set(traces["references"]["text"]) == {"mobilenet_v3_small", "mobilenet_v3_large"}
    assert traces["feasible front"]["line"]["shape"] == "hv"
    assert "budget 2.0 ms" in html


def test_importances_use_trained_networks_only():
    """Draws over the budget (value 0, all wide) would make width look decisive; among trained networks only
    the learning rate matters."""
    budget = 2.0
    study = optuna.create_study(direction="maximize")
    rng = np.random.default_rng(0)
    for _ in range(24):
        lr, width = float(10 ** rng.uniform(-3, 0)), float(rng.choice([0.5, 1.0]))
        study.add_trial(_trial("complete", 0.5 + 0.1 * np.log10(lr), 1.0, budget, {"lr": lr, "width": width}))
    for _ in range(30):
        lr = float(10 ** rng.uniform(-3, 0))
        study.add_trial(_trial("infeasible", None, 3.0, budget, {"lr": lr, "width": 1.0}))
    values = dict(importances(study, make_objective("accuracy", budget)))
    assert values["lr"] > 0.9 > values["width"]


def test_importances_name_a_dozen_and_group_the_rest_per_stage():
    raw = {f"s{i}.b{j}.kernel": 0.01 * (i + j + 1) for i in range(3) for j in range(5)}
    raw |= {"width": 0.5, "train.optimizer.lr": 0.3}
    grouped = grouped_importances(raw)
    named = [n for n, _ in grouped if ":" not in n]
    assert len(named) == 12 and named[:2] == ["width", "train.optimizer.lr"]
    groups = {n: v for n, v in grouped if ":" in n}  # the five least important kernels, summed per stage
    assert groups == pytest.approx(
        {"stage 0: 2 other choices": 0.03, "stage 1: 2 other choices": 0.05, "stage 2: 1 other choice": 0.03}
    )
    assert sum(v for _, v in grouped) == pytest.approx(sum(raw.values()))
    assert [v for _, v in grouped] == sorted((v for _, v in grouped), reverse=True)


def test_the_importance_chart_says_what_it_rests_on_and_needs_enough_networks(tmp_path, capsys):
    """Issue 32, item 8: fANOVA over 4 networks and a dozen choices ranks noise: no chart, one line; with
    enough networks the chart says how many it rests on."""
    budget = 2.0
    few = _study(budget)
    for n in range(3):
        few.add_trial(_trial("complete", 0.5 + 0.01 * n, 1.0, budget, {"lr": 0.01 * (n + 1), "width": 0.5}))
    files = {f.name for f in study_plots(few, tmp_path / "few", make_objective("accuracy", budget))}
    assert "param_importances.png" not in files and "accuracy_vs_latency.png" in files
    assert "what-matters chart not drawn: 3 trained network(s) sampled by the search, fewer than the 20" in (
        capsys.readouterr().out
    )
    enough = optuna.create_study(direction="maximize")
    rng = np.random.default_rng(0)
    for _ in range(20):
        lr, width = float(10 ** rng.uniform(-3, 0)), float(rng.choice([0.5, 1.0]))
        enough.add_trial(_trial("complete", 0.5 + 0.1 * np.log10(lr), 1.0, budget, {"lr": lr, "width": width}))
    study_plots(enough, tmp_path / "enough", make_objective("accuracy", budget))
    html = (tmp_path / "enough" / "param_importances.html").read_text()
    assert "importance for val_acc (fANOVA over 20 trained networks)" in html
