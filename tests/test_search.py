"""The search: Optuna study + MLflow runs, resumption, latency constraint, samplers and pruning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from nas.errors import NasError
from nas.latency.estimator import make_estimator
from nas.search.runner import EXIT_NO_FEASIBLE, run_search
from nas.search.study import make_sampler
from nas.search.summary import verified_counts
from nas.space import load_space
from nas.urls import mask_url
from tests.conftest import FAST, compose_cfg


def cfg_for(space, *extra):
    return compose_cfg(f"+space={space}", *FAST, *extra)


def client() -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path.cwd()}/outputs/mlflow.db")


def runs_of(study: str):
    c = client()
    exp = c.get_experiment_by_name(study)
    return c.search_runs([exp.experiment_id], max_results=1000)


def test_four_trials_one_parent_four_nested_runs_then_resume(in_tmp, tiny_space, capsys):
    result = run_search(cfg_for(tiny_space, "trials=4", "search.plots=true"))
    assert result.exit_code == 0
    runs = runs_of("tiny-digits")
    parents = [r for r in runs if r.data.tags.get("nas.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("nas.kind") == "trial"]
    assert len(parents) == 1 and len(trials) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.sampler._target_"] == "optuna.samplers.TPESampler"
    assert parent.data.params["search.pruner._target_"] == "optuna.pruners.MedianPruner"
    assert "latency.budget_ms" in parent.data.params
    c = client()
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id, "best")}
    assert {"best/best_trials.json", "best/best_trials.yaml", "best/best_arch.txt"} <= artifacts
    best_arch = Path(c.download_artifacts(parent.info.run_id, "best/best_arch.txt", str(in_tmp))).read_text()
    assert best_arch.strip() == result.study.best_trial.user_attrs["arch"]
    assert [a.path for a in c.list_artifacts(parent.info.run_id, "space")] == ["space/tiny.yaml"]
    plots = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert {
        "plots/accuracy_vs_latency.png",
        "plots/accuracy_vs_latency.html",
        "plots/optimization_history.png",
    } <= plots
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["nas.state"] == "complete" and run.info.status == "FINISHED"
        assert run.data.params["arch"].startswith("nas1-r16-")
        assert {"width", "train.optimizer.lr", "train.optimizer.weight_decay", "s0.depth"} <= set(run.data.params)
        assert {"val_acc", "latency_ms", "params", "flops", "train_loss", "val_loss"} <= set(run.data.metrics)
        history = c.get_metric_history(run.info.run_id, "val_acc")
        # One epoch: one entry at step 0, the accuracy the trial was ranked by (2-epoch histories: below).
        trial = result.study.trials[int(run.data.tags["optuna.trial_number"])]
        assert [(m.step, m.value) for m in history] == [(0, pytest.approx(trial.user_attrs["val_acc"]))]
    out = capsys.readouterr().out
    assert out.count("] trial ") == 4 and "[4/4]" in out
    assert "mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db" in out
    # The printed retrain command names what retraining needs to find the study and train alike.
    assert (
        "python -m nas.retrain study.name=tiny-digits data=digits train/optimizer=sgd train/schedule=cosine "
        "train.batch_size=64   (the full recipe: 200 epochs" in out
    )

    # Same command again: nothing to do.
    run_search(cfg_for(tiny_space, "trials=4"))
    assert len(optuna.load_study(study_name="tiny-digits", storage="sqlite:///outputs/optuna.db").trials) == 4
    # trials=6 adds exactly two, under the same parent run.
    run_search(cfg_for(tiny_space, "trials=6"))
    study = optuna.load_study(study_name="tiny-digits", storage="sqlite:///outputs/optuna.db")
    assert len(study.trials) == 6
    runs = runs_of("tiny-digits")
    assert sum(r.data.tags.get("nas.kind") == "study" for r in runs) == 1
    assert sum(r.data.tags.get("nas.kind") == "trial" for r in runs) == 6
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs if r.data.tags["nas.kind"] == "trial") == list(
        range(6)
    )


def test_seeded_studies_sample_the_same_architectures(in_tmp, tiny_space):
    # Draws over an impossible budget are not trained: what is compared is the sampling alone.
    # One draw per trial: every arch drawn is in the study.
    untrained = ("latency.budget_ms=0.0001", "search.precheck_budget=false", "search.max_draws_over_budget=3",
                 "search.draws_per_trial=1")  # fmt: skip
    a = run_search(cfg_for(tiny_space, "trials=2", "study.name=a", "search.sampler=random", *untrained))
    b = run_search(cfg_for(tiny_space, "trials=2", "study.name=b", "search.sampler=random", *untrained))
    arch = lambda r: [t.user_attrs["arch"] for t in r.study.trials]  # noqa: E731
    assert len(arch(a)) == 3 and arch(a) == arch(b) and len(set(arch(a))) > 1
    other = load_space(tiny_space)
    assert [other.sample(optuna.trial.FixedTrial(t.params)).encode() for t in a.study.trials] == arch(a)


def test_draws_over_an_impossible_budget_stop_the_search_naming_the_fastest(in_tmp, tiny_space, capsys):
    cfg = cfg_for(
        tiny_space, "trials=3", "latency.budget_ms=0.0001", "search.precheck_budget=false",
        "search.max_draws_over_budget=7", "search.draws_per_trial=3", "latency.estimator=table",
        "latency.calibrate=2", "search.enqueue_references=false", "search.startup_trials=1",
    )  # fmt: skip
    result = run_search(cfg)
    assert result.exit_code == EXIT_NO_FEASIBLE
    # 3 draws for the first trial (two refused, the fastest kept over the budget), then, past the sampler's
    # start-up of one trial, twice as many but only the 4 left of the streak of 7 for the second.
    trials = result.study.trials
    refused = [t.user_attrs["refused_draws"] for t in trials]
    assert [r["count"] for r in refused] == [2, 3] and len(trials) == 2
    fastest = min([t.user_attrs["latency_ms"] for t in trials] + [r["fastest_ms"] for r in refused])
    assert (
        f"no architecture met the latency budget of 0.0001 ms in the last 7 draws (search.max_draws_over_budget=7, "
        f"the fastest {fastest:.4f} ms; 0/3 networks trained)" in result.message
    )
    for t, r in zip(trials, refused, strict=True):
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.user_attrs["state"] == "infeasible" and t.constraints["latency_ms_over_budget"] > 0
        assert "val_acc" not in t.user_attrs
        assert r["fastest_ms"] <= r["sample_ms"] and r["fastest_ms"] > 0.0001
        assert t.user_attrs["latency_ms"] <= r["fastest_ms"]  # the trial kept is the fastest of its draws
    runs = runs_of("tiny-digits")
    assert [r.data.tags.get("nas.kind") for r in runs] == ["study"]  # no run per untrained draw
    parent = runs[0]
    assert parent.data.metrics["n_over_budget"] == 7 and parent.data.metrics["n_trained"] == 0
    assert parent.data.metrics["n_refused_draws"] == 5
    assert parent.data.metrics["fastest_over_budget_ms"] == pytest.approx(fastest)
    path = client().download_artifacts(parent.info.run_id, "over_budget.json", str(in_tmp))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert sorted(r["trial"] for r in rows if r["kind"] == "trial") == [0, 1]
    assert sorted(r["trial"] for r in rows if r["kind"] == "refused_fastest") == [0, 1]
    assert [r["latency_ms"] for r in rows] == sorted(r["latency_ms"] for r in rows)
    captured = capsys.readouterr()
    assert "error: no architecture met the latency budget" in captured.err
    assert "0 trained (0 complete, 0 pruned), 7 over budget (not trained)" in captured.out


def test_unreachable_budget_is_refused_up_front(in_tmp, tiny_space):
    with pytest.raises(NasError, match=r"latency.budget_ms=0.0001 cannot be met: the cheapest network of space tiny"):
        run_search(cfg_for(tiny_space, "trials=3", "latency.budget_ms=0.0001"))


def just_under_the_first_draw(space_file, cfg) -> float:
    """A budget the seeded sampler's first draw misses by a hair (from the table the search will use): at least
    one draw is over it whatever this machine's layer timings, and the draws faster than that one still fit."""
    space = load_space(space_file)
    estimator = make_estimator(cfg.latency, 10, space, int(cfg.seed))
    first = estimator.latency_ms(space.sample(optuna.create_study(sampler=make_sampler(cfg)).ask()))
    assert any(estimator.latency_ms(space.sample(seed)) < first for seed in range(50)), "no draw is faster"
    return round(first * (1 - 1e-6), 9)


def test_trials_counts_trained_networks_and_draws_over_budget_are_refused_before_they_are_trials(
    in_tmp, tiny_space, capsys
):
    table = ("latency.estimator=table", "latency.calibrate=2", "search/sampler=random")
    budget = just_under_the_first_draw(tiny_space, cfg_for(tiny_space, *table))
    result = run_search(cfg_for(tiny_space, "trials=4", f"latency.budget_ms={budget}", *table))
    assert result.exit_code == 0
    trials = result.study.trials
    trained = [t for t in trials if t.user_attrs["state"] == "complete"]
    assert len(trained) == 4 and len(trials) == 4  # the draws over the budget never became trials
    refused = [t.user_attrs.get("refused_draws") for t in trials]
    assert refused[0] and refused[0]["fastest_ms"] > budget and refused[0]["sample_ms"] > budget  # the first draw
    for t in trials:  # every trial records its latency and the constraint, and is within the budget
        assert t.constraints["latency_ms_over_budget"] == pytest.approx(t.user_attrs["latency_ms"] - budget)
        assert t.user_attrs["latency_ms"] <= budget and "val_acc" in t.user_attrs
    runs = [r for r in runs_of("tiny-digits") if r.data.tags.get("nas.kind") == "trial"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == [t.number for t in trained]
    n_refused = sum(r["count"] for r in refused if r)
    out = capsys.readouterr().out
    assert out.count("] trial ") == 4 and "[4/4]" in out
    assert f"4 trained (4 complete, 0 pruned), {n_refused} over budget (not trained)" in out
    assert f"draw(s) over the {budget} ms budget, not trained" in out
    # Resuming for more trains exactly that many more networks.
    more = run_search(cfg_for(tiny_space, "trials=5", f"latency.budget_ms={budget}", *table))
    assert sum(t.user_attrs["state"] == "complete" for t in more.study.trials) == 5


def test_every_draw_is_a_trial_with_one_draw_per_trial(in_tmp, tiny_space):
    """search.draws_per_trial=1: the old path, every draw over the budget a trial the sampler learns from."""
    table = ("latency.estimator=table", "latency.calibrate=2", "search/sampler=random")
    budget = just_under_the_first_draw(tiny_space, cfg_for(tiny_space, *table))
    result = run_search(cfg_for(tiny_space, "trials=2", f"latency.budget_ms={budget}", "search.draws_per_trial=1",
                                *table))  # fmt: skip
    over = [t for t in result.study.trials if t.user_attrs["state"] == "infeasible"]
    assert over and over[0].number == 0 and not any("refused_draws" in t.user_attrs for t in result.study.trials)
    assert all(t.constraints["latency_ms_over_budget"] > 0 for t in over)


def test_draws_near_the_budget_are_measured_before_they_are_judged(in_tmp, tiny_space, capsys):
    """latency.verify_band: a draw whose table prediction lies within the band of the budget is measured and
    judged by the measurement; each records both figures, and the summary says how many decisions changed."""
    table = ("latency.estimator=table", "latency.calibrate=2", "search/sampler=random")
    space = load_space(tiny_space)
    estimator = make_estimator(cfg_for(tiny_space, *table).latency, 10, space, 0)
    budget = float(np.median([estimator.latency_ms(space.sample(seed)) for seed in range(40)]))
    result = run_search(cfg_for(tiny_space, "trials=2", f"latency.budget_ms={budget}", "latency.verify_band=0.3",
                                *table))  # fmt: skip
    assert result.exit_code == 0
    for t in result.study.trials:
        ua = t.user_attrs
        predicted, near = ua["latency_predicted_ms"], abs(ua["latency_predicted_ms"] - budget) <= 0.3 * budget
        assert ("latency_measured_ms" in ua) == near
        assert ua["latency_ms"] == (ua["latency_measured_ms"] if near else predicted)
        flipped = near and (predicted <= budget) != (ua["latency_measured_ms"] <= budget)
        assert ua.get("budget_decision_changed", False) == flipped
        assert (ua["state"] == "infeasible") == (ua["latency_ms"] > budget)  # judged by the figure it records
    judged, measured, changed = verified_counts(result.study)
    refused = [t.user_attrs["refused_draws"] for t in result.study.trials if "refused_draws" in t.user_attrs]
    assert judged == len(result.study.trials) + sum(r["count"] for r in refused)  # refused draws were judged too
    near = sum("latency_measured_ms" in t.user_attrs for t in result.study.trials)
    assert measured == near + sum(r["measured"] for r in refused) and measured >= 1
    out = capsys.readouterr().out
    assert "draws predicted within ±30.0% of the budget are measured in torch before they are judged" in out
    assert f"latency near the budget: {measured} of {judged} draws measured on the target" in out
    assert f"the measurement changed {changed} budget decisions" in out


def test_pareto_objective_produces_a_front(in_tmp, tiny_space, capsys):
    result = run_search(
        cfg_for(tiny_space, "trials=4", "search.objective=pareto", "search/sampler=nsga2", "study.name=moo")
    )
    assert result.exit_code == 0
    assert result.study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    front = result.study.best_trials
    assert front
    for t in front:  # no other trial is at least as accurate and at least as fast, and better in one
        assert not any(
            o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
            for o in result.study.trials
        )
    parent = next(r for r in runs_of("moo") if r.data.tags.get("nas.kind") == "study")
    path = client().download_artifacts(parent.info.run_id, "pareto_front.json", str(in_tmp))
    table = json.loads(Path(path).read_text())
    assert sorted(table["data"][i][0] for i in range(len(table["data"]))) == sorted(t.number for t in front)
    assert "Pareto front" in capsys.readouterr().out


def _strong_trials(study: optuna.Study, n: int, epochs: int) -> None:
    """Finished trials that reported 0.99 at every epoch: any real tiny network is worse than them."""
    for _ in range(n):
        study.add_trial(
            optuna.trial.create_trial(
                value=0.99,
                intermediate_values=dict.fromkeys(range(epochs), 0.99),
                params={},
                distributions={},
                user_attrs={
                    "state": "complete",
                    "val_acc": 0.99,
                    "latency_ms": 1.0,
                    "params": 1,
                    "flops": 1,
                    "arch": "x",
                },
            )
        )


def test_default_pruner_stops_a_worse_trial_after_the_warmup_epoch(in_tmp, tiny_space):
    base = ("train.epochs=3", "search.startup_trials=2")
    study = run_search(cfg_for(tiny_space, "trials=0", *base)).study
    _strong_trials(study, 2, epochs=3)
    result = run_search(cfg_for(tiny_space, "trials=3", *base))
    last = result.study.trials[-1]
    assert last.state == optuna.trial.TrialState.PRUNED
    assert list(last.intermediate_values) == [0, 1]  # warm-up epoch 0 never prunes; stopped after epoch 1
    assert last.user_attrs["val_acc"] == pytest.approx(last.intermediate_values[1])  # its last accuracy, kept
    run = next(r for r in runs_of("tiny-digits") if r.data.tags.get("optuna.trial_number") == str(last.number))
    assert run.data.tags["nas.state"] == "pruned"
    assert [m.step for m in client().get_metric_history(run.info.run_id, "val_acc")] == [0, 1]
    assert [m.step for m in client().get_metric_history(run.info.run_id, "train_loss")] == [0]  # epoch 1 unfinished


def test_no_pruning_without_enough_trials_reported_at_that_epoch(in_tmp, tiny_space):
    base = ("train.epochs=3", "search.startup_trials=3")
    study = run_search(cfg_for(tiny_space, "trials=0", *base)).study
    _strong_trials(study, 2, epochs=3)  # one short of search.startup_trials
    result = run_search(cfg_for(tiny_space, "trials=3", *base))
    last = result.study.trials[-1]
    assert last.state == optuna.trial.TrialState.COMPLETE and list(last.intermediate_values) == [0, 1, 2]
    # Its MLflow run holds every epoch, at step = epoch, the same accuracies the pruner was told.
    run = next(r for r in runs_of("tiny-digits") if r.data.tags.get("optuna.trial_number") == str(last.number))
    history = [(m.step, m.value) for m in client().get_metric_history(run.info.run_id, "val_acc")]
    assert history == [(step, pytest.approx(value)) for step, value in last.intermediate_values.items()]
    assert [m.step for m in client().get_metric_history(run.info.run_id, "train_loss")] == [0, 1, 2]


def test_references_run_first_as_yardsticks_and_an_interrupted_one_trains_on_the_rerun(in_tmp, tiny_space, monkeypatch):
    """The queued yardstick is trial 0. Ctrl-C while it trains: it is recorded as failed and goes back to the
    queue (as a surplus or heartbeat-retried trial does), so the rerun trains it before sampling anything."""
    from nas.search import objective

    text = (
        tiny_space.read_text() + "references:\n  - {name: mobilenet_v3_small, stem_stride: 1, first_stride2_as_1: 1}\n"
    )
    tiny_space.write_text(text)
    real = objective.train_arch
    monkeypatch.setattr(objective, "train_arch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    stopped = run_search(cfg_for(tiny_space, "trials=2"))
    assert stopped.exit_code == 130
    assert stopped.study.trials[0].user_attrs["reference"] == "mobilenet_v3_small"
    assert stopped.study.trials[0].state == optuna.trial.TrialState.FAIL
    monkeypatch.setattr(objective, "train_arch", real)
    result = run_search(cfg_for(tiny_space, "trials=2"))
    trained = [t for t in result.study.trials if t.user_attrs.get("state") == "complete"]
    first = trained[0]
    assert first.number == 1 and first.user_attrs["reference"] == "mobilenet_v3_small"
    assert first.user_attrs["arch"].startswith("nas1-r16-w1-stem_c16_s1_hs-k3_e1_c16_s1_re_se-k3_e4.5_c24_s2_re")
    assert len(trained) == 2 and "reference" not in trained[1].user_attrs
    run = next(r for r in runs_of("tiny-digits") if r.data.tags.get("optuna.trial_number") == "1")
    assert run.data.tags["nas.reference"] == "mobilenet_v3_small"


def test_a_mobilenet_v2_style_space_searches_with_its_reference(in_tmp, tmp_path):
    """ReLU6, no SE, a head conv without hidden classifier layer, MobileNetV2 as yardstick (the layout
    of the shipped mbv2 space, at 16 px and two stages so it runs in seconds)."""
    space = tmp_path / "spaces" / "v2tiny.yaml"
    space.parent.mkdir()
    space.write_text(
        "resolution: 16\nwidth: [0.25, 0.5]\nstem: {channels: 32, stride: 1, activation: relu6}\n"
        "block: {kernel: [3, 5, 7], expansion: [3, 6], se: false, activation: relu6}\n"
        "stages:\n  - {channels: 16, stride: 2, depth: [1, 2]}\n  - {channels: 24, stride: 2, depth: [1, 2]}\n"
        "head: {channels: 64, activation: relu6}\n"
        "references:\n  - {name: mobilenet_v2, stem_stride: 1, first_stride2_as_1: 1}\n"
    )
    result = run_search(cfg_for(space, "trials=2"))
    reference, searched = result.study.trials[:2]
    assert reference.user_attrs["reference"] == "mobilenet_v2"
    assert reference.user_attrs["arch"] == load_space(space).reference_archs()["mobilenet_v2"].encode()
    assert reference.user_attrs["arch"].endswith("-k3_e6_c320_s1_r6-head_c1280_r6")
    assert searched.user_attrs["arch"].endswith("-head_c64_r6")  # sampled: ReLU6 head, no fc segment
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.value > 0 for t in (reference, searched))


def test_mask_url_hides_passwords():
    assert mask_url("postgresql://nas:s3cret@db:5432/optuna") == "postgresql://nas:***@db:5432/optuna"
    assert mask_url("sqlite:///outputs/optuna.db") == "sqlite:///outputs/optuna.db"
    assert mask_url("postgresql+psycopg://nas:p@ss@db/optuna") == "postgresql+psycopg://nas:***@db/optuna"
    assert mask_url("http://me:tok3n@mlflow.example:5000/") == "http://me:***@mlflow.example:5000/"
    assert mask_url("http://mlflow.example:5000") == "http://mlflow.example:5000"


def test_one_copy_of_the_images_serves_every_resolution_of_a_space():
    """The search's data module is built once per process: a 24-px network after a 16-px one reads the same
    stored images, resized per batch; only a changed data setting (a searched data.* key) builds another."""
    from nas.search.objective import Objective
    from nas.train.run import apply_hparams, load_training_data

    cfg = compose_cfg(*FAST)
    objective = Objective(cfg, None, load_training_data(cfg), None, None, 10, None)  # data is all it needs here
    first = objective.datamodule(cfg, 16)
    stored = first.train_split.x.data_ptr()
    again = objective.datamodule(apply_hparams(cfg, {"train.batch_size": 32, "seed": 3}), 24)
    assert again is first and again.train_split.x.data_ptr() == stored
    assert (again.resolution, again.batch_size, again.seed) == (24, 32, 3)
    x, _ = next(iter(again.train_dataloader()))
    assert x.shape == (32, 3, 24, 24)
    other = objective.datamodule(apply_hparams(cfg, {"data.hflip": not cfg.data.hflip}), 16)
    assert other is not first and other.hflip is (not cfg.data.hflip)
    objective.release_data()
    assert objective.splits is None
    reloaded = objective.datamodule(cfg, 16)  # a run after the release loads the images again
    assert objective.splits is not None and torch.equal(reloaded.train_split.x, first.train_split.x)
