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
from nas.search.finalists import Candidate, Finalist, RoundSettings, pick_winner, verdicts
from nas.search.runner import run_search
from nas.studies import FINALISTS_SUFFIX, ROUND_ATTR, latest_study
from nas.train.module import NonFiniteLossError
from tests.conftest import FAST, TINY_ARCH, compose_cfg

# Enough steps (batch 32, two passes) for MobileNetV3-Small to learn digits in one epoch, so accuracies differ.
ROUND = (
    "search.finalists=2",
    "search.finalist_epochs=1",
    "search.finalist_seeds=2",
    "search.fidelity_sample=1",
    "train.batch_size=32",
    "data.repeat=2",
)
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
    cfg = compose_cfg(f"+space={space}", *FAST, "trials=4", *ROUND)
    result = run_search(cfg)
    assert result.exit_code == 0
    study = result.study
    record = study.user_attrs[ROUND_ATTR]
    ranked = StudyObjective().ranked(study)
    # The two best trials by search accuracy, the reference (which may be one of them), one other at random.
    expected = [t.number for t in ranked[:2]] + [t.number for t in ranked[2:] if t.user_attrs.get("reference")]
    assert [c["trial"] for c in record["candidates"] if not c["sample"]] == expected
    (sample,) = [c for c in record["candidates"] if c["sample"]]
    assert sample["trial"] not in expected and sample["measured_ms"] is None and record["winner"] != sample["trial"]
    expected.append(sample["trial"])
    assert "mobilenet_v3_small" in {c["reference"] for c in record["candidates"]}

    # Every network trained once per seed for finalist_epochs, each run kept in the round's study. Issue 28: the
    # seeds are ones no search trial trained with, the same two for every network (paired), and every run
    # trains with one recipe, the best trial's hyperparameters, references included.
    search_seeds = {t.user_attrs["seed"] for t in study.trials if "val_acc" in t.user_attrs}
    jobs = [t for t in round_trials(study.study_name) if t.state == TrialState.COMPLETE]
    round_seeds = sorted({t.user_attrs["seed"] for t in jobs})
    assert len(round_seeds) == 2 and not search_seeds & set(round_seeds) and record["round_seeds"] == round_seeds
    assert sorted((t.user_attrs["trial"], t.user_attrs["seed"]) for t in jobs) == sorted(
        (n, s) for n in expected for s in round_seeds
    )
    assert {t.user_attrs["epochs"] for t in jobs} == {1}
    keys = study.user_attrs["identity"]["search.hparams"]  # the reference, if it is the best, has none: defaults
    best_hparams = {k: v for k, v in ranked[0].params.items() if k in keys}
    assert all(t.user_attrs["hparams"] == best_hparams for t in jobs)
    for c in record["candidates"]:
        accs = [t.user_attrs["val_acc"] for t in jobs if t.user_attrs["trial"] == c["trial"]]
        assert c["val_acc_mean"] == pytest.approx(statistics.fmean(accs))
        assert c["val_acc_std"] == pytest.approx(statistics.stdev(accs))
        assert c["val_acc_low"] <= c["val_acc_mean"] <= c["val_acc_high"]
        if not c["sample"]:
            assert c["measured_ms"] > 0 and c["p10_ms"] <= c["measured_ms"] <= c["p90_ms"]
        assert c["search_acc"] == study.trials[c["trial"]].user_attrs["val_acc"]
        if not c["reference"] and not c["sample"]:  # a verdict against the reference, from the paired test
            (verdict,) = c["verdicts"]
            assert verdict["reference"] == "mobilenet_v3_small" and verdict["seeds"] == 2
            assert verdict["verdict"] in ("beats", "ties", "loses") and verdict["p_value"] is not None
    # No budget: the winner is the best mean accuracy among the contenders.
    best = max((c for c in record["candidates"] if not c["sample"]), key=lambda c: (c["val_acc_mean"], -c["trial"]))
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
        if c["sample"]:  # there for the proxy's fidelity: trained, not measured
            assert "latency_ms_measured" not in run.data.metrics
        else:
            assert run.data.metrics["latency_ms_measured"] == pytest.approx(c["measured_ms"])
        assert run.data.tags["nas.finalist.role"] == ("fidelity_sample" if c["sample"] else "contender")
        assert run.data.tags["nas.finalist.winner"] == str(c["trial"] == record["winner"]).lower()
        children = [r for r in seed_runs if r.data.tags["mlflow.parentRunId"] == run.info.run_id]
        assert sorted(int(r.data.tags["nas.seed"]) for r in children) == round_seeds
        assert all(r.info.status == "FINISHED" and "val_acc" in r.data.metrics for r in children)
        for child in children:  # the run's hyperparameters as MLflow has them: the best trial's
            assert {k: float(child.data.params[k]) for k in best_hparams} == pytest.approx(best_hparams)
    assert {r.data.tags["nas.stage"] for r in mlflow_runs(in_tmp, study.study_name, "trial")} == {"search"}
    # Four or five networks: too few for a rank correlation to mean anything, and the round says so.
    assert record["fidelity"]["networks"] == len(expected) < 5 and record["kendall_tau"] is None
    assert parent.data.metrics["proxy_networks"] == len(expected) and "proxy_kendall_tau" not in parent.data.metrics
    out = capsys.readouterr().out
    n = len(expected)
    among = any(t.user_attrs.get("reference") for t in ranked[:2])
    who = ", mobilenet_v3_small among them" if among else ", and the reference(s) mobilenet_v3_small"
    seeds = ", ".join(map(str, round_seeds))
    assert (f"finalist round: {n} networks (the 2 best trial(s){who}, and 1 other trial(s) drawn at random to "
            f"measure the proxy's fidelity) x 2 seed(s) ({seeds}: none used by a search trial) x 1 epochs, all with "
            f"the hyperparameters of trial {ranked[0].number}, the search's best: {2 * n} runs") in out  # fmt: skip
    assert f"finalists (2 seed(s) x 1 epochs, seeds {seeds} shared by every network; latency measured in torch" in out
    assert f"winner: {best['reference'] or 'trial ' + str(best['trial'])} (*)" in out
    w = next(c for c in record["candidates"] if c["trial"] == record["winner"])
    assert f"{w['val_acc_mean']:.4f} [{w['val_acc_low']:.4f}, {w['val_acc_high']:.4f}] over 2 run(s)" in out
    assert "[fidelity sample]" in out and "(fidelity sample: not measured)" in out
    assert f"proxy fidelity: too few networks to estimate fidelity ({n}; at least 5" in out

    # The same command again: nothing is trained twice, the study run's table is rewritten, not appended to.
    run_search(cfg)
    assert len(round_trials(study.study_name)) == len(jobs)
    assert f"{2 * n} runs, {2 * n} already done" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "finalists.json", str(in_tmp))).read_text())
    assert sorted(row[table["columns"].index("trial")] for row in table["data"]) == sorted(expected)
    figures = json.loads(Path(client.download_artifacts(parent.info.run_id, "finalist_round.json", str(in_tmp)))
                         .read_text())  # fmt: skip
    assert figures["fidelity"]["networks"] == n and figures["round_seeds"] == round_seeds

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
                      "search.finalist_seeds=3", "search.fidelity_sample=0")  # fmt: skip
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
    assert sorted(t.user_attrs["seed"] for t in done) == [1, 2, 3]  # each once (after seed 0, the search's)
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
    base = (f"+space={tiny_space}", *FAST, "trials=2", "search.finalist_epochs=1", "search.fidelity_sample=0")
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
    cfg = compose_cfg(f"+space={tiny_space}", *FAST, "trials=2", "search.finalists=1", "search.finalist_epochs=1",
                      "search.finalist_seeds=2", "search.fidelity_sample=0")  # fmt: skip
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
    assert "not finished: trial" in out and "seed 1: non-finite loss" in out


def _finalist(trial: int, search_acc: float, accs: list[float], ms: float, reference: str | None = None,
              sample: bool = False) -> Finalist:  # fmt: skip
    c = Candidate(trial, TINY_ARCH, {}, reference, search_acc, ms, 1000, sample=sample)
    return Finalist(c, dict(enumerate(accs, start=1)), measured_ms=ms, p10_ms=ms, p90_ms=ms)


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
    # A network of the fidelity sample is there to measure the proxy, not to be picked.
    lucky = _finalist(2, 0.5, [0.99, 0.99], 1.0, sample=True)
    assert pick_winner([fast, slow, lucky], StudyObjective()) is slow


def test_verdicts_are_paired_over_shared_seeds_and_corrected_per_reference():
    ref = _finalist(9, 0.8, [0.80, 0.82, 0.79, 0.81, 0.80], 1.0, reference="mobilenet_v3_small")
    clear = _finalist(1, 0.8, [0.85, 0.86, 0.84, 0.86, 0.85], 1.0)  # +0.05 on every seed, give or take 0.01
    # The old rule (difference > sum of sds): +0.01 against a spread of 0.04 "ties"; paired, the seeds move
    # together and the same +0.01 on each is no more than the pairing noise here either.
    close = _finalist(2, 0.8, [0.81, 0.83, 0.80, 0.82, 0.80], 1.0)
    worse = _finalist(3, 0.8, [0.70, 0.71, 0.69, 0.70, 0.72], 1.0)
    one = _finalist(4, 0.8, [0.95], 1.0)
    sample = _finalist(5, 0.8, [0.95, 0.96, 0.95, 0.96, 0.95], 1.0, sample=True)
    out = verdicts([ref, clear, close, worse, one, sample], 0.05)
    assert set(out) == {9, 1, 2, 3, 4}  # the reference is in the table (no verdict against itself); no sample
    assert out[9] == []
    assert [c.verdict for c in out[1]] == ["beats"] and out[1][0].diff == pytest.approx(0.048)
    assert [c.verdict for c in out[3]] == ["loses"]
    assert [c.verdict for c in out[4]] == ["one seed: no verdict"]
    assert out[2][0].interval.low < out[2][0].diff < out[2][0].interval.high


def test_every_network_of_the_round_trains_with_one_recipe():
    """search.finalist_hparams=best (default): the best feasible trial's hyperparameters for everyone, the
    references included; =own: each trial its own, the references the best trial's."""
    study = optuna.create_study(direction="maximize")
    lr = "train.optimizer.lr"
    study.set_user_attr("identity", {"search.hparams": {lr: {}}})
    floats = optuna.distributions.FloatDistribution
    dist = {lr: floats(0.001, 1.0), "width": floats(0.0, 1.0)}
    attrs = {"arch": TINY_ARCH, "latency_ms": 1.0, "params": 1000, "state": "complete"}
    for acc, value in ((0.9, 0.3), (0.8, 0.05), (0.6, 0.01), (0.5, 0.02)):
        study.add_trial(optuna.create_trial(value=acc, params={lr: value, "width": 0.5}, distributions=dist,
                                            user_attrs={**attrs, "val_acc": acc}))  # fmt: skip
    study.add_trial(optuna.create_trial(value=0.7, user_attrs={**attrs, "val_acc": 0.7, "reference": "mbv3"}))
    settings = RoundSettings(count=2, epochs=1, seeds=2, fidelity_sample=1)
    best = finalists_module.pick_candidates(study, StudyObjective(), settings, seed=0)
    assert [c.trial for c in best if not c.sample] == [0, 1, 4]
    assert sum(c.sample for c in best) == 1 and next(c for c in best if c.sample).trial in (2, 3)
    assert all(c.hparams == {lr: 0.3} for c in best)  # architecture choices are not hyperparameters
    own = finalists_module.pick_candidates(study, StudyObjective(), RoundSettings(2, 1, 2, 1, "own"), seed=0)
    assert {c.trial: c.hparams[lr] for c in own if not c.sample} == {0: 0.3, 1: 0.05, 4: 0.3}
    # The round's seeds come after the search's (seed 0 here) and skip any seed a trial trained with.
    assert finalists_module.round_seeds(study, 0, 3) == [1, 2, 3]
    study.add_trial(optuna.create_trial(value=0.4, user_attrs={**attrs, "val_acc": 0.4, "seed": 2}))
    assert finalists_module.round_seeds(study, 0, 3) == [1, 3, 4]
    pruned = optuna.create_trial(state=TrialState.PRUNED, user_attrs={"state": "pruned", "seed": 3})
    study.add_trial(pruned)  # it trained with seed 3 too, though it never finished
    assert finalists_module.round_seeds(study, 0, 3) == [1, 4, 5]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.finalists=-1", "search.finalists=-1 must be a whole number >= 0"),
        ("search.finalist_seeds=0", "search.finalist_seeds=0 must be a whole number >= 1"),
        ("search.finalist_epochs=1.5", "search.finalist_epochs=1.5 must be a whole number >= 1"),
        ("search.fidelity_sample=-2", "search.fidelity_sample=-2 must be a whole number >= 0"),
        ("search.finalist_hparams=mine", "search.finalist_hparams='mine' is not one of best, own"),
        ("search.verdict_alpha=1.5", "search.verdict_alpha=1.5 must be a probability between 0 and 1"),
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
    assert (settings.count, settings.epochs, settings.seeds, settings.fidelity_sample) == (3, 12, 3, 3)


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
