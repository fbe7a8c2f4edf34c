"""The finalist round after a search: best trials and references trained again per seed, latency measured,
a winner within the budget, the proxy's rank correlation, resumable, and the winner retrained."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from nas.errors import NasError
from nas.objectives import MnasObjective, StudyObjective
from nas.retrain.run import retrain
from nas.retrain.select import from_study
from nas.search import finalists as finalists_module
from nas.search.finalists import Candidate, Finalist, RoundSettings, compare, pick_winner, rank_correlation
from nas.search.runner import run_search
from nas.studies import FINALISTS_SUFFIX, ROUND_ATTR, latest_study
from nas.train.module import NonFiniteLossError
from tests.conftest import FAST, TINY_ARCH, compose_cfg

# Enough steps (batch 32, two passes) for MobileNetV3-Small to learn digits in one epoch, so accuracies differ.
ROUND = ("search.finalists=2", "search.finalist_epochs=1", "train.batch_size=32", "data.repeat=2")
STORAGE = "sqlite:///outputs/optuna.db"


def with_reference(space: Path) -> Path:
    space.write_text(
        space.read_text() + "references:\n  - {name: mobilenet_v3_small, stem_stride: 1, first_stride2_as_1: 1}\n"
    )
    return space


def round_trials(name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name + FINALISTS_SUFFIX, storage=STORAGE).get_trials(deepcopy=False)


def mlflow_runs(folder: Path, experiment: str, kind: str) -> list:
    client = MlflowClient(f"sqlite:///{folder}/outputs/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`nas.kind` = '{kind}'", max_results=1000)


def test_a_search_ends_with_a_finalist_round_that_retrain_takes_its_winner_from(in_tmp, tiny_space, capsys):
    space = with_reference(tiny_space)
    cfg = compose_cfg(f"+space={space}", *FAST, "trials=3", *ROUND)
    result = run_search(cfg)
    assert result.exit_code == 0
    study = result.study
    record = study.user_attrs[ROUND_ATTR]
    ranked = StudyObjective().ranked(study)
    # The two best trials by search accuracy, and the reference (which may be one of them).
    expected = [t.number for t in ranked[:2]] + [t.number for t in ranked[2:] if t.user_attrs.get("reference")]
    assert [c["trial"] for c in record["candidates"]] == expected
    assert "mobilenet_v3_small" in {c["reference"] for c in record["candidates"]}

    # Every candidate trained once per seed (seeds 0 and 1) for finalist_epochs, each run kept in the round's study.
    jobs = [t for t in round_trials(study.study_name) if t.state == TrialState.COMPLETE]
    assert sorted((t.user_attrs["trial"], t.user_attrs["seed"]) for t in jobs) == sorted(
        (n, s) for n in expected for s in (0, 1)
    )
    assert {t.user_attrs["epochs"] for t in jobs} == {1}
    for c in record["candidates"]:
        accs = [t.user_attrs["val_acc"] for t in jobs if t.user_attrs["trial"] == c["trial"]]
        assert c["val_acc_mean"] == pytest.approx(statistics.fmean(accs))
        assert c["val_acc_std"] == pytest.approx(statistics.stdev(accs))
        assert c["measured_ms"] > 0 and c["p10_ms"] <= c["measured_ms"] <= c["p90_ms"]
        assert c["search_acc"] == study.trials[c["trial"]].user_attrs["val_acc"]
    # No budget: the winner is the best mean accuracy.
    best = max(record["candidates"], key=lambda c: (c["val_acc_mean"], -c["trial"]))
    assert record["winner"] == best["trial"]

    # MLflow: a finalist run per candidate under the study's run, a run per seed under it; trial runs say search.
    parent = mlflow_runs(in_tmp, study.study_name, "study")[0]
    finalist_runs = mlflow_runs(in_tmp, study.study_name, "finalist")
    seed_runs = mlflow_runs(in_tmp, study.study_name, "finalist_seed")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in finalist_runs) == sorted(expected)
    for run in finalist_runs:
        c = next(c for c in record["candidates"] if c["trial"] == int(run.data.tags["optuna.trial_number"]))
        assert run.data.tags["nas.stage"] == "finalist" and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.metrics["val_acc_mean"] == pytest.approx(c["val_acc_mean"])
        assert run.data.metrics["val_acc_std"] == pytest.approx(c["val_acc_std"])
        assert run.data.metrics["latency_ms_measured"] == pytest.approx(c["measured_ms"])
        assert run.data.tags["nas.finalist.winner"] == str(c["trial"] == record["winner"]).lower()
        children = [r for r in seed_runs if r.data.tags["mlflow.parentRunId"] == run.info.run_id]
        assert sorted(r.data.tags["nas.seed"] for r in children) == ["0", "1"]
        assert all(r.info.status == "FINISHED" and "val_acc" in r.data.metrics for r in children)
    assert {r.data.tags["nas.stage"] for r in mlflow_runs(in_tmp, study.study_name, "trial")} == {"search"}
    # The reference learns digits in one epoch and the tiny networks do not: the ranks differ, tau is defined.
    assert record["kendall_tau"] is not None
    assert parent.data.metrics["proxy_kendall_tau"] == pytest.approx(record["kendall_tau"])
    out = capsys.readouterr().out
    n = len(expected)
    among = any(t.user_attrs.get("reference") for t in ranked[:2])
    who = ", mobilenet_v3_small among them" if among else ", and the reference(s) mobilenet_v3_small"
    assert f"finalist round: {n} networks (the 2 best trial(s){who}) x 2 seed(s) x 1 epochs: {2 * n} runs" in out
    assert "finalists (2 seed(s) x 1 epochs; latency measured in torch on" in out
    assert f"winner: {best['reference'] or 'trial ' + str(best['trial'])} (*)" in out
    assert "proxy fidelity: Kendall tau" in out

    # The same command again: nothing is trained twice, the study run's table is rewritten, not appended to.
    run_search(cfg)
    assert len(round_trials(study.study_name)) == len(jobs)
    assert f"{2 * n} runs, {2 * n} already done" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "finalists.json", str(in_tmp))).read_text())
    assert sorted(row[table["columns"].index("trial")] for row in table["data"]) == sorted(expected)

    # nas.retrain select=best retrains the round's winner, and says so.
    retrain_cfg = compose_cfg(
        f"+space={space}", *FAST, "train.epochs=1", "+select=best", "+run_id=null",
        "+retrain={train_on_val: true, register: true, model_name: null, alias: champion, export: false, "
        "allow_over_budget: false}",
    )  # fmt: skip
    r = retrain(retrain_cfg)
    assert (r.selection.how, r.selection.trial) == ("finalist", record["winner"])
    run = client.get_run(r.run_id)
    assert run.data.tags["nas.source.how"] == "finalist"
    assert run.data.tags["nas.source.trial"] == str(record["winner"])
    assert r.model_version == "1" and r.alias_moved


def test_an_interrupted_round_resumes_without_training_a_finished_run_again(in_tmp, tiny_space, monkeypatch, capsys):
    """Ctrl-C during the second finalist run; the rerun trains the rest, the finished run is not redone."""
    cfg = compose_cfg(f"+space={tiny_space}", *FAST, "trials=2", "search.finalists=1", "search.finalist_epochs=1",
                      "search.finalist_seeds=3")  # fmt: skip
    real, calls = finalists_module.train_arch, []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finalists_module, "train_arch", interrupted_on_the_second)
    result = run_search(cfg)
    assert result.exit_code == 130
    assert "in the finalist round" in result.message and "Rerun the same command" in result.message
    name = result.study.study_name
    first = round_trials(name)
    assert [t.state for t in first] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert ROUND_ATTR not in result.study.user_attrs  # no outcome from half a round

    monkeypatch.setattr(finalists_module, "train_arch", real)
    capsys.readouterr()
    assert run_search(cfg).exit_code == 0
    assert "3 runs, 1 already done" in capsys.readouterr().out
    done = [t for t in round_trials(name) if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["seed"] for t in done) == [0, 1, 2]  # each seed once; seed 0 from the first run
    assert done[0].number == first[0].number
    seed_runs = mlflow_runs(in_tmp, name, "finalist_seed")
    assert sorted(r.info.status for r in seed_runs) == ["FINISHED", "FINISHED", "FINISHED", "KILLED"]


def test_a_rerun_trains_only_todays_plan_and_measures_every_finalist_in_its_own_passes(
    in_tmp, tiny_space, monkeypatch, capsys
):
    """Issue 25, findings 3-5. A round of 2 x 2 runs: the first fails (out of memory), Ctrl-C in the second.
    The rerun with 1 finalist x 1 seed drops the two queued runs that no longer belong to the round, trains the
    one run of its plan, and no longer lists that run's old failure; a rerun that adds a finalist measures both
    finalists in its own interleaved passes; the same command again reuses those figures."""
    base = (f"+space={tiny_space}", *FAST, "trials=2", "search.finalist_epochs=1")
    real_train, calls = finalists_module.train_arch, []

    def out_of_memory_then_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (tried to allocate 2.00 GiB)")
        raise KeyboardInterrupt

    monkeypatch.setattr(finalists_module, "train_arch", out_of_memory_then_interrupted)
    result = run_search(compose_cfg(*base, "search.finalists=2", "search.finalist_seeds=2"))
    assert result.exit_code == 130
    name = result.study.study_name
    first = round_trials(name)
    assert [t.state for t in first] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]
    best, second = (first[0].user_attrs["arch"], first[2].user_attrs["arch"])

    trained, measured = [], []
    monkeypatch.setattr(finalists_module, "train_arch",
                        lambda *a, **k: trained.append(a[1].encode()) or real_train(*a, **k))  # fmt: skip
    real_measure = finalists_module.measure_arch
    monkeypatch.setattr(finalists_module, "measure_arch",
                        lambda arch, *a: measured.append(arch.encode()) or real_measure(arch, *a))  # fmt: skip
    capsys.readouterr()
    assert run_search(compose_cfg(*base, "search.finalists=1", "search.finalist_seeds=1")).exit_code == 0
    out = capsys.readouterr().out
    assert "dropped 2 queued finalist run(s) no longer in the round" in out
    assert trained == [best]  # the plan's one run, not the stale ones queued before it
    assert "not finished" not in out  # its out-of-memory failure was made good by this run
    stale = [t for t in round_trials(name) if t.user_attrs.get("state") == "stale"]
    assert [t.number for t in stale] == [first[2].number, first[3].number] and stale[0].state == TrialState.FAIL
    assert measured == [best] * 3

    trained.clear(), measured.clear()
    assert run_search(compose_cfg(*base, "search.finalists=2", "search.finalist_seeds=1")).exit_code == 0
    assert trained == [second]
    assert measured == [best, second] * 3  # both finalists, interleaved, in this run: no figure from the last one
    record = optuna.load_study(study_name=name, storage=STORAGE).user_attrs[ROUND_ATTR]
    assert len(record["candidates"]) == 2 and all(c["measured_ms"] > 0 for c in record["candidates"])

    trained.clear(), measured.clear()
    assert run_search(compose_cfg(*base, "search.finalists=2", "search.finalist_seeds=1")).exit_code == 0
    assert trained == [] and measured == []  # nothing changed: the same finalists' figures are kept


def test_a_finalist_run_that_diverges_is_reported_and_the_round_goes_on(in_tmp, tiny_space, monkeypatch, capsys):
    cfg = compose_cfg(f"+space={tiny_space}", *FAST, "trials=2", "search.finalists=1", "search.finalist_epochs=1")
    real, calls = finalists_module.train_arch, []

    def diverging_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise NonFiniteLossError("loss is nan at epoch 0")
        return real(*args, **kwargs)

    monkeypatch.setattr(finalists_module, "train_arch", diverging_first)
    result = run_search(cfg)
    assert result.exit_code == 0
    record = result.study.user_attrs[ROUND_ATTR]
    assert [c["runs"] for c in record["candidates"]] == [1]  # the mean of the one seed that finished
    out = capsys.readouterr().out
    assert "failed: non-finite loss: loss is nan at epoch 0" in out
    assert "not finished: trial" in out and "seed 0: non-finite loss" in out


def _finalist(trial: int, search_acc: float, accs: list[float], ms: float, reference: str | None = None) -> Finalist:
    c = Candidate(trial, TINY_ARCH, {}, reference, search_acc, ms, 1000)
    return Finalist(c, accs, measured_ms=ms, p10_ms=ms, p90_ms=ms)


def test_rank_correlation_is_kendalls_tau_of_search_and_finalist_accuracy():
    # Pairs (search order vs finalist order): (0,1) concordant, (0,2) concordant, (1,2) discordant: (2-1)/3.
    three = [_finalist(0, 0.1, [0.5], 1), _finalist(1, 0.2, [0.7], 1), _finalist(2, 0.3, [0.6], 1)]
    assert rank_correlation(three) == pytest.approx(1 / 3)
    reversed_ = [_finalist(0, 0.1, [0.9], 1), _finalist(1, 0.2, [0.8], 1), _finalist(2, 0.3, [0.7], 1)]
    assert rank_correlation(reversed_) == pytest.approx(-1.0)
    assert rank_correlation(three[:1]) is None  # one network: no ranking to compare
    assert rank_correlation([_finalist(0, 0.1, [0.5], 1), _finalist(1, 0.2, [0.5], 1)]) is None  # all tied


def test_the_winner_is_the_best_mean_within_the_measured_budget():
    fast, slow = _finalist(0, 0.9, [0.80, 0.82], 1.0), _finalist(1, 0.8, [0.90, 0.92], 3.0)
    assert pick_winner([fast, slow], StudyObjective()) is slow  # no budget: accuracy alone
    slow.over_budget = True  # its measured latency broke the budget: it cannot win
    assert pick_winner([fast, slow], StudyObjective(budget_ms=2.0)) is fast
    fast.over_budget = True
    assert pick_winner([fast, slow], StudyObjective(budget_ms=2.0)) is None
    # The soft MnasNet objective weighs measured latency in: 0.81 x (1/2)^-0.5 beats 0.91 x (3/2)^-0.5.
    fast.over_budget = slow.over_budget = False
    assert pick_winner([fast, slow], MnasObjective(budget_ms=2.0, exponent=-0.5)) is fast


def test_beating_a_reference_takes_more_than_the_seeds_spread():
    ref = _finalist(9, 0.8, [0.80, 0.82], 1.0, reference="mobilenet_v3_small")  # mean 0.81, sd 0.0141
    clear = _finalist(1, 0.8, [0.85, 0.86], 1.0)  # +0.045 against a spread of 0.0212
    close = _finalist(2, 0.8, [0.80, 0.84], 1.0)  # +0.01 against a spread of 0.0424
    worse = _finalist(3, 0.8, [0.70, 0.70], 1.0)
    assert compare(clear, ref) == (pytest.approx(0.045), "beats")
    assert compare(close, ref)[1] == "ties"
    assert compare(worse, ref)[1] == "loses"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.finalists=-1", "search.finalists=-1 must be a whole number >= 0"),
        ("search.finalist_seeds=0", "search.finalist_seeds=0 must be a whole number >= 1"),
        ("search.finalist_epochs=1.5", "search.finalist_epochs=1.5 must be a whole number >= 1"),
        ("search.phase=finalists", "search.phase=finalists is for workers joining a running finalist round"),
        ("search.phase=retrain", "search.phase='retrain' is not one of search, finalists"),
    ],
)
def test_bad_round_settings_are_refused_before_anything_runs(in_tmp, tiny_space, override, message):
    with pytest.raises(NasError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=1", override))
    assert not (in_tmp / "outputs").exists()


def test_finalist_epochs_default_to_three_times_the_search_epochs():
    settings = RoundSettings.from_cfg(compose_cfg("train.epochs=4"))
    assert (settings.count, settings.epochs, settings.seeds) == (3, 12, 2)


def test_retrain_selection_prefers_the_round_winner_and_says_when_the_round_is_stale():
    study = optuna.create_study(direction="maximize")
    for acc in (0.9, 0.8):
        attrs = {"arch": TINY_ARCH, "val_acc": acc, "latency_ms": 1.0, "state": "complete"}
        study.add_trial(optuna.create_trial(value=acc, user_attrs=attrs))
    study.set_user_attr(ROUND_ATTR, {"winner": 1, "trained": 2})
    chosen = from_study(study, "best", None, [])
    assert (chosen.trial, chosen.how, chosen.note) == (1, "finalist", None)
    assert (from_study(study, "search", None, []).trial, from_study(study, "search", None, []).how) == (0, "search")
    study.add_trial(optuna.create_trial(value=0.7, user_attrs={**attrs, "val_acc": 0.7}))
    assert (
        "the finalist round ran when 2 networks were trained, the study has 3 now"
        in from_study(study, "best", None, []).note
    )
    study.set_user_attr(ROUND_ATTR, {"winner": None, "trained": 3, "no_winner_reason": "no finalist run finished"})
    fallback = from_study(study, "best", None, [])  # nothing was measured: the search's best, with a note
    assert (fallback.trial, fallback.how) == (0, "best") and "no finalist run finished" in fallback.note
    # Issue 25, finding 7: every finalist measured over the budget, the search's best among them. It is not
    # retrained for 200 epochs to end registered without the alias: refused, naming what to do.
    over = [{"trial": 0, "reference": None, "measured_ms": 1.3, "over_budget": True},
            {"trial": 1, "reference": None, "measured_ms": 1.2, "over_budget": True}]  # fmt: skip
    study.set_user_attr("identity", {"budget_ms": 1.0})
    why = "no finalist met the latency budget when measured"
    study.set_user_attr(ROUND_ATTR, {"winner": None, "trained": 3, "finalists": 2, "candidates": over,
                                     "no_winner_reason": why})  # fmt: skip
    with pytest.raises(NasError, match=r"measured every finalist over the 1\.0 ms budget \(trial 0 1\.300 ms, trial 1 "
                       r"1\.200 ms\): no network within the budget to retrain\. Rerun the search with more finalists "
                       r"\(search\.finalists=5\).*select=search"):  # fmt: skip
        from_study(study, "best", None, [])
    assert from_study(study, "search", None, []).trial == 0  # asked for by name: still the search's best


def test_the_latest_study_is_never_a_finalist_round(in_tmp):
    storage = "sqlite:///latest.db"
    search = optuna.create_study(study_name="search", storage=storage)
    search.add_trial(optuna.create_trial(value=1.0))
    later = optuna.create_study(study_name="search" + FINALISTS_SUFFIX, storage=storage)
    later.add_trial(optuna.create_trial(value=1.0))
    assert latest_study(storage) == "search"
