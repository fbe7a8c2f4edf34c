"""What a study is made of: samplers and pruners from config files, pruning rules, and what a resume must keep."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas.errors import NasError
from nas.objectives import make_objective
from nas.search.pruning import EvidencePruner
from nas.search.runner import run_search
from nas.search.study import make_pruner, make_sampler, with_group_files
from tests.conftest import FAST, HANG_S, TINY_SPACE, compose_cfg, subprocess_env, write_image_folder


def _search(space: Path, *extra: str):
    return run_search(compose_cfg(f"+space={space}", *FAST, *extra))


# -- samplers and pruners: a YAML file each -------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "cls"),
    [
        ("search/sampler=tpe", optuna.samplers.TPESampler),
        ("search/sampler=gp", optuna.samplers.GPSampler),
        ("search/sampler=nsga2", optuna.samplers.NSGAIISampler),
        ("search/sampler=random", optuna.samplers.RandomSampler),
        ("search.sampler=random", optuna.samplers.RandomSampler),  # the short spelling still works
        ("search.sampler=gp", optuna.samplers.GPSampler),
    ],
)
def test_sampler_files(override, cls):
    sampler = make_sampler(with_group_files(compose_cfg(override)))
    assert type(sampler) is cls


def test_sampler_seed_makes_draws_repeatable():
    cfg = with_group_files(compose_cfg("search.sampler=random", "seed=3"))
    draws = []
    for _ in range(2):
        study = optuna.create_study(sampler=make_sampler(cfg))
        draws.append([study.ask().suggest_float("x", 0, 1) for _ in range(3)])
    assert draws[0] == draws[1]
    other = optuna.create_study(sampler=make_sampler(cfg, resumed_at=5))  # a resumed study draws anew
    assert [other.ask().suggest_float("x", 0, 1) for _ in range(3)] != draws[0]


def test_pruner_files_sit_behind_the_evidence_rule():
    accuracy = make_objective("accuracy", None)
    median = make_pruner(with_group_files(compose_cfg("search.startup_trials=4")), accuracy)
    assert isinstance(median, EvidencePruner) and isinstance(median.wrapped, optuna.pruners.MedianPruner)
    assert (median.min_trials, median.warmup_epochs) == (4, 1)
    hyperband = make_pruner(with_group_files(compose_cfg("search/pruner=hyperband", "train.epochs=9")), accuracy)
    assert isinstance(hyperband.wrapped, optuna.pruners.HyperbandPruner) and hyperband.wrapped._max_resource == 9
    assert isinstance(
        make_pruner(with_group_files(compose_cfg("search/pruner=none")), accuracy), optuna.pruners.NopPruner
    )
    pareto = make_objective("pareto", None)  # Optuna cannot prune multi-objective trials
    assert isinstance(make_pruner(with_group_files(compose_cfg()), pareto), optuna.pruners.NopPruner)


def test_unknown_or_broken_sampler_is_one_clear_error(tmp_path):
    with pytest.raises(NasError, match=r"search.sampler='cmaes' is not one of gp, nsga2, random, tpe"):
        with_group_files(compose_cfg("search.sampler=cmaes"))
    folder = tmp_path / "conf" / "search" / "sampler"
    folder.mkdir(parents=True)
    (folder / "typo.yaml").write_text("_target_: optuna.samplers.NoSuchSampler\n")
    cfg = compose_cfg(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "search/sampler=typo")
    with pytest.raises(NasError, match=r"search.sampler: cannot create optuna.samplers.NoSuchSampler"):
        make_sampler(cfg)


def _study_with(values: dict[int, list[float]], running: optuna.trial.FrozenTrial | None = None) -> optuna.Study:
    """Finished trials that reported ``values`` (one per epoch)."""
    study = optuna.create_study(direction="maximize")
    for number, curve in values.items():
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE, value=curve[-1], intermediate_values=dict(enumerate(curve)),
                user_attrs={"n": number},
            )
        )  # fmt: skip
    return study


def _frozen(curve: list[float]) -> optuna.trial.FrozenTrial:
    """The trial being judged (numbered after the study's own)."""
    trial = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values=dict(enumerate(curve)))
    trial.number = 99
    return trial


def test_evidence_pruner_needs_reports_at_that_epoch_and_the_warmup():
    strong = {i: [0.9, 0.9, 0.9] for i in range(3)}
    study = _study_with(strong)
    pruner = EvidencePruner(optuna.pruners.MedianPruner(n_startup_trials=0), min_trials=3, warmup_epochs=1)
    assert pruner.prune(study, _frozen([0.1, 0.1]))  # 3 others reported at epoch 1, it is below them
    assert not pruner.prune(study, _frozen([0.1]))  # epoch 0 is the warm-up
    assert not pruner.prune(study, _frozen([0.95, 0.95]))  # the wrapped pruner says keep
    short = _study_with({0: [0.9, 0.9], 1: [0.9, 0.9], 2: [0.9]})  # only two reached epoch 1
    assert not pruner.prune(short, _frozen([0.1, 0.1]))
    # Optuna's own pruners count startup trials among COMPLETE ones, untrained draws included:
    draws = _study_with({0: [0.9, 0.9]})
    for _ in range(5):
        draws.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.0))
    assert optuna.pruners.MedianPruner(n_startup_trials=5).prune(draws, _frozen([0.1, 0.1]))
    assert not EvidencePruner(optuna.pruners.MedianPruner(), 5, 1).prune(draws, _frozen([0.1, 0.1]))


def test_hyperband_no_longer_narrows_tpe_to_one_bracket():
    """Optuna shows a sampler only the trials of the current Hyperband bracket when the study's pruner is a
    HyperbandPruner; behind the evidence rule TPE learns from every trial."""
    from optuna.pruners import _filter_study

    def seen(pruner: optuna.pruners.BasePruner) -> int:
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for i in range(30):
            trial = study.ask()
            trial.report(0.5, 0)
            trial.should_prune()
            study.tell(trial, float(i))
        return len(_filter_study(study, study.trials[-1]).get_trials(deepcopy=False))

    hyperband = lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9)  # noqa: E731
    assert seen(hyperband()) < 30
    assert seen(EvidencePruner(hyperband(), 0, 0)) == 30


def test_gp_sampler_runs_a_study(in_tmp, tiny_space):
    result = _search(tiny_space, "trials=3", "search/sampler=gp", "search.startup_trials=1")
    assert result.exit_code == 0 and isinstance(result.study.sampler, optuna.samplers.GPSampler)
    assert sum(t.state == TrialState.COMPLETE for t in result.study.trials) == 3


def test_a_sampler_file_added_by_the_user_runs_through_the_command(tmp_path):
    conf = tmp_path / "myconf" / "search" / "sampler"
    conf.mkdir(parents=True)
    (conf / "qmc.yaml").write_text("_target_: optuna.samplers.QMCSampler\nqmc_type: halton\nscramble: true\n")
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    args = [f"+space={space}", *FAST, "trials=2", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
            "search/sampler=qmc"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "nas.search", *args], capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(), timeout=HANG_S)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[2/2] trial" in proc.stdout
    study = optuna.load_study(study_name="tiny-digits", storage=f"sqlite:///{tmp_path}/outputs/optuna.db")
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2


# -- resuming: refuse what makes trials incomparable, naming the key ------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=2", "train.epochs: 1 -> 2"),
        ("train.batch_size=32", "train.batch_size: 64 -> 32"),
        ("data.val_size=0.25", "data.val_size: 0.2 -> 0.25"),
        ("data.repeat=2", "data.repeat: 1 -> 2"),
        ("data.split_seed=1", "data.split_seed: 0 -> 1"),
        ("data.augment=resizedcrop", "data.augment: 'auto' -> 'resizedcrop'"),
        ("latency.threads=2", "latency.threads: 1 -> 2"),
        ("latency.batch_size=2", "latency_batch: 1 -> 2"),
        ("latency.estimator=table", "latency.estimator: 'measure' -> 'table'"),
        ("++search.hparams={train.dropout: {type: categorical, choices: [0.1, 0.3]}}", "search.hparams"),
        ("latency.budget_ms=50", "budget_ms: None -> 50"),
    ],
)
def test_resume_refuses_settings_that_change_what_trials_mean(in_tmp, tiny_space, override, key):
    _search(tiny_space, "trials=0", "study.name=s")
    with pytest.raises(NasError, match=r"study 's' was created with a different setup \(.*" + key.replace("(", r"\(")):
        _search(tiny_space, "trials=0", "study.name=s", override, "latency.calibrate=2")
    _search(tiny_space, "trials=0", "study.name=s", "latency.repeats=7")  # the same setup resumes as before


def test_a_resumed_table_study_predicts_with_its_own_layers_and_calibration(in_tmp, tiny_space, monkeypatch):
    """Issue 25, finding 2: the study keeps the layer latencies and calibration its trials were judged by. A
    resume (or a worker) predicts exactly those figures, measures nothing, whatever happened to the table file
    (here: deleted); another latency.calibrate is refused, naming it."""
    from nas.latency import table as table_module
    from nas.search.runner import open_session
    from nas.space import decode
    from nas.studies import LATENCY_ATTR

    table = ("latency.estimator=table", "latency.calibrate=2", "study.name=t")
    first = _search(tiny_space, "trials=1", *table)
    trial = next(t for t in first.study.trials if t.state == TrialState.COMPLETE)
    assert first.study.user_attrs[LATENCY_ATTR]["calibration"]["networks"] == 2
    shutil.rmtree(in_tmp / "outputs" / "latency")
    monkeypatch.setattr(table_module.LatencyTable, "ensure", lambda *a, **k: pytest.fail("measured again"))
    session = open_session(compose_cfg(f"+space={tiny_space}", *FAST, "trials=1", *table))
    estimator = session.objective.estimator
    assert estimator.latency_ms(decode(trial.user_attrs["arch"])) == trial.user_attrs["latency_ms"]  # exactly
    assert not (in_tmp / "outputs" / "latency").exists()
    with pytest.raises(NasError, match=r"latency\.calibrate: 2 -> 3"):
        _search(tiny_space, "trials=1", *table[:1], "latency.calibrate=3", "study.name=t")


def test_mnas_exponent_is_part_of_an_mnas_study(in_tmp, tiny_space):
    _search(tiny_space, "trials=0", "study.name=m", "search.objective=mnas", "latency.budget_ms=1")
    with pytest.raises(NasError, match=r"search.mnas_exponent: -0.07 -> -0.15"):
        _search(
            tiny_space, "trials=0", "study.name=m", "search.objective=mnas", "latency.budget_ms=1",
            "search.mnas_exponent=-0.15",
        )  # fmt: skip


def test_image_folders_get_their_own_study_and_refuse_each_other(in_tmp, tiny_space):
    a = write_image_folder(in_tmp / "a", seed=0)
    b = write_image_folder(in_tmp / "b", seed=1)
    first = _search(tiny_space, "trials=0", "data=imagefolder", f"data.root={a}")
    second = _search(tiny_space, "trials=0", "data=imagefolder", f"data.root={b}")
    names = [first.study.study_name, second.study.study_name]
    assert names[0].startswith("tiny-imagefolder-") and names[0] != names[1]  # never one study for two folders
    with pytest.raises(NasError, match=r"\(data\.root: '.*/a' -> '.*/b'; data\.fingerprint: "):
        _search(tiny_space, "trials=0", "data=imagefolder", f"data.root={b}", f"study.name={names[0]}")
    moved = in_tmp / "moved"
    shutil.copytree(a, moved)  # the same files elsewhere (new mtimes): the same data, resumed
    again = _search(tiny_space, "trials=0", "data=imagefolder", f"data.root={moved}", f"study.name={names[0]}")
    assert again.study.study_name == names[0]
