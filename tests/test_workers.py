"""Several workers on one study: planning per GPU, exact trial counts on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from nas import trial_states
from nas.errors import NasError
from nas.search import workers
from nas.search.runner import run_search
from tests.conftest import FAST as SEARCH_FAST
from tests.conftest import budget_at_percentile, compose_cfg

FAST = (*SEARCH_FAST, "latency.estimator=table", "latency.calibrate=2")


def _plan(*overrides, gpus=8):
    return [(p.index, p.gpu) for p in workers.plan(compose_cfg(*overrides), available_gpus=gpus)]


def test_worker_plan_per_gpu():
    assert _plan(gpus=0) == [(0, None)]
    assert _plan("search.workers=3", gpus=0) == [(0, None), (1, None), (2, None)]
    assert _plan("search.gpus=all", gpus=2) == [(0, 0), (1, 1)]
    assert _plan("search.gpus=2", "search.trials_per_gpu=2") == [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert _plan("search.gpus=[0,2]") == [(0, 0), (1, 2)]
    assert _plan("search.trials_per_gpu=3", gpus=1) == [(0, 0), (1, 0), (2, 0)]
    with pytest.raises(NasError, match=r"asks for GPU \[5\] but 2 CUDA device"):
        _plan("search.gpus=[0,5]", gpus=2)
    with pytest.raises(NasError, match=r"needs a GPU; on CPU use search\.workers=N"):
        _plan("search.trials_per_gpu=2", gpus=0)


def test_concurrent_workers_refuse_measured_latency(tiny_space):
    with pytest.raises(NasError, match=r"latency\.estimator=table"):
        run_search(compose_cfg(f"+space={tiny_space}", "data=digits", "search.workers=2", "latency.estimator=measure"))


def _check_exact(study: optuna.Study, tracking_uri: str, target: int) -> None:
    trials = study.get_trials(deepcopy=False)
    trained = [t for t in trials if t.user_attrs.get("state") == "complete"]
    assert len(trained) == target
    assert len({t.number for t in trials}) == len(trials)
    # Only a trial that lost the race for the last slot may be FAIL, and it never trained.
    assert all(t.user_attrs.get("state") == "surplus" for t in trials if t.state == TrialState.FAIL)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([exp.experiment_id], "tags.`nas.kind` = 'trial'", max_results=1000)
    counts = Counter(r.data.tags["optuna.trial_number"] for r in runs)
    assert sorted(counts) == sorted(str(t.number) for t in trained)  # one run per trained network, none for draws
    assert set(counts.values()) == {1}
    # Both processes trained networks.
    assert {t.user_attrs["worker"] for t in trained} == {0, 1}


def test_two_workers_share_a_sqlite_study_with_a_budget(in_tmp, tiny_space):
    cfg = compose_cfg(f"+space={tiny_space}", *FAST)
    budget = budget_at_percentile(tiny_space, cfg, 0.4)  # most draws are over it: trained networks must still add up
    result = run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=5", "search.workers=2",
                                    f"latency.budget_ms={budget}", "search.finalists=2",
                                    "search.finalist_epochs=1", "search.finalist_seeds=2",
                                    "search.fidelity_sample=0"))  # fmt: skip
    assert result.exit_code == 0
    _check_exact(result.study, f"sqlite:///{in_tmp}/outputs/mlflow.db", 5)
    # Draws over the budget were refused before they became trials, in both processes' samplers.
    assert trial_states.counts(result.study)[trial_states.OVER_BUDGET] > 0
    assert all(t.user_attrs["latency_ms"] <= budget for t in trial_states.trained(result.study))
    # The finalist round ran in the same two processes: each (finalist, seed) run trained exactly once.
    jobs = optuna.load_study(study_name="tiny-digits.finalists", storage="sqlite:///outputs/optuna.db").trials
    trained = [t for t in jobs if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["key"] for t in trained) == sorted({t.user_attrs["key"] for t in trained})
    assert len(trained) == 4 and {t.user_attrs["worker"] for t in trained} == {0, 1}
    assert all(t.user_attrs.get("state") == "surplus" for t in jobs if t.state != TrialState.COMPLETE)
    # The budget is tight (40th percentile of the table's predictions) and the round measures: a winner only
    # where a finalist measured within it (it happened that neither did, which the round is there to catch).
    record = result.study.user_attrs["finalist_round"]
    assert [c["runs"] for c in record["candidates"]] == [2, 2]
    assert (record["winner"] is None) == all(c["over_budget"] for c in record["candidates"])
    assert all(c["over_budget"] == (c["measured_ms"] > budget) for c in record["candidates"])


def test_two_workers_share_a_postgresql_study_with_the_password_from_pgpassword(in_tmp, tiny_space, monkeypatch):
    url = os.environ.get("NAS_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide a PostgreSQL server: .ci/run starts one and sets NAS_TEST_POSTGRES_URL")
        pytest.skip("no PostgreSQL server here: set NAS_TEST_POSTGRES_URL=postgresql://user:pw@127.0.0.1/db")
    parts = urlsplit(url)
    assert parts.password, "NAS_TEST_POSTGRES_URL needs a password, which this test moves to PGPASSWORD"
    bare = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@")))
    monkeypatch.setenv("PGPASSWORD", parts.password)  # libpq's own variable: no password on the command line
    name = f"pg-{uuid.uuid4().hex[:8]}"
    result = run_search(
        compose_cfg(
            f"+space={tiny_space}", *FAST, "trials=4", "search.workers=2", f"study.storage={bare}", f"study.name={name}"
        )
    )
    assert result.exit_code == 0
    study = optuna.load_study(study_name=name, storage=url)
    _check_exact(study, f"sqlite:///{in_tmp}/outputs/mlflow.db", 4)


def test_workers_get_the_gpus_this_process_was_given():
    """Under a scheduler's allocation (CUDA_VISIBLE_DEVICES=2,3) search.gpus indexes those two GPUs."""
    plans = workers.plan(compose_cfg("search.gpus=all"), available_gpus=2)
    base = {"CUDA_VISIBLE_DEVICES": "2,3", "PATH": "/bin"}
    envs = [workers.worker_env(p, len(plans), base, {}) for p in plans]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3"]
    only_second = workers.plan(compose_cfg("search.gpus=[1]"), available_gpus=2)
    assert workers.worker_env(only_second[0], 1, base, {})["CUDA_VISIBLE_DEVICES"] == "3"
    assert workers.worker_env(only_second[0], 1, {}, {})["CUDA_VISIBLE_DEVICES"] == "1"  # nothing inherited
    # One pinned GPU still runs in a pinned process: this one may already have initialised another GPU.
    assert workers.needs_processes(only_second) and not workers.needs_processes(workers.plan(compose_cfg(), 1))


def test_worker_config_file_holds_no_secret(tmp_path):
    cfg = compose_cfg(
        "study.storage=postgresql://nas:s3cret@db/optuna", "mlflow.tracking_uri=http://me:t0ken@mlflow:5000"
    )
    secrets = workers.write_worker_config(cfg, tmp_path)
    text = (tmp_path / "worker.yaml").read_text()
    assert "s3cret" not in text and "t0ken" not in text and "${oc.env:NAS_STUDY_STORAGE}" in text
    env = workers.worker_env(workers.WorkerPlan(0, None), 1, {}, secrets)
    assert env["NAS_STUDY_STORAGE"] == "postgresql://nas:s3cret@db/optuna"
    assert env["NAS_MLFLOW_TRACKING_URI"] == "http://me:t0ken@mlflow:5000"


def test_a_workers_stop_reason_reaches_the_main_process(in_tmp, tiny_space, capsys):
    faults = "{" + ", ".join(f"{n}: error" for n in range(12)) + "}"
    result = run_search(
        compose_cfg(f"+space={tiny_space}", *FAST, "trials=3", "search.workers=2",
                    "search.max_consecutive_failures=1", f"+search.inject_faults={faults}")
    )  # fmt: skip
    assert result.exit_code == 4
    assert "workers exited (codes [4, 4]) with 0/3 networks trained (worker 0: stopped after 1 consecutive" in (
        result.message
    )
    assert "worker 1: stopped after 1 consecutive failed trials" in result.message
    assert "injected fault" in result.message


def test_queued_references_are_never_lost_to_the_surplus_rule():
    """Two workers pop the two queued references at once for the study's last slot: the later trial is
    surplus, and its reference goes back to the queue (before, it ended FAIL and was never trained)."""
    from nas.objectives import make_objective
    from nas.search.objective import Objective, SurplusTrial, TrialOutcome

    study = optuna.create_study(direction="maximize")
    for name in ("mobilenet_v3_small", "mobilenet_v3_large"):
        study.enqueue_trial({}, user_attrs={"reference": name, "arch": f"arch-of-{name}"})
    first, second = study.ask(), study.ask()  # worker A, then worker B, both before either trains
    objective = Objective(compose_cfg("trials=1"), None, None, None, None, 10, make_objective("accuracy", None))
    objective._claim(first, TrialOutcome(first.number, "complete", None, None, None, None, 0.0))  # A trains
    with pytest.raises(SurplusTrial):
        objective._claim(second, TrialOutcome(second.number, "complete", None, None, None, None, 0.0))
    study.tell(second, state=TrialState.FAIL)
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert [t.user_attrs for t in waiting] == [
        {"reference": "mobilenet_v3_large", "arch": "arch-of-mobilenet_v3_large"}
    ]
    assert study.trials[second.number].user_attrs["state"] == "surplus"


def test_a_hand_started_worker_that_measures_latency_is_warned_about_its_neighbours(capsys):
    """Review finding C3: a worker started by hand cannot count the others on its device; it says what is at
    stake (the main process refuses measuring beside workers it starts itself)."""
    workers.check_latency_for_concurrency(compose_cfg("search.role=worker", "latency.estimator=measure"), 0)
    assert "latency.estimator=table" in capsys.readouterr().err
    workers.check_latency_for_concurrency(compose_cfg("search.role=worker", "latency.estimator=table"), 0)
    workers.check_latency_for_concurrency(compose_cfg("latency.estimator=measure"), 1)
    assert capsys.readouterr().err == ""
    with pytest.raises(NasError, match="2 concurrent workers would disturb"):
        workers.check_latency_for_concurrency(compose_cfg("latency.estimator=measure"), 2)
    # A table that measures the draws near the budget measures here too; an agent on the device does not.
    near = ("latency.estimator=table", "latency.budget_ms=1", "latency.verify_band=0.1")
    with pytest.raises(NasError, match=r"2 concurrent workers would disturb .* without latency.verify_band"):
        workers.check_latency_for_concurrency(compose_cfg(*near), 2)
    workers.check_latency_for_concurrency(compose_cfg(*near, "latency.target=http://127.0.0.1:8765"), 2)
    workers.check_latency_for_concurrency(compose_cfg("latency.estimator=measure", "latency.target=http://h:1"), 2)
