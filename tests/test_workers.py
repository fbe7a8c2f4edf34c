"""Several workers on one study: planning per GPU, exact trial counts on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections import Counter

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from nas.errors import NasError
from nas.search import workers
from nas.search.runner import run_search
from tests.conftest import FAST as SEARCH_FAST
from tests.conftest import compose_cfg

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
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == target
    assert len({t.number for t in trials}) == len(trials)
    # Only a trial that lost the race for the last slot may be FAIL, and it never ran.
    assert all(t.user_attrs.get("state") == "surplus" for t in trials if t.state == TrialState.FAIL)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([exp.experiment_id], "tags.`nas.kind` = 'trial'", max_results=1000)
    counts = Counter(r.data.tags["optuna.trial_number"] for r in runs)
    assert sorted(counts) == sorted(str(t.number) for t in complete)
    assert set(counts.values()) == {1}
    # Two processes really ran trials (their seeds differ, so their architectures do too).
    assert len({t.user_attrs["arch"] for t in complete}) == target


def test_two_workers_share_a_sqlite_study(in_tmp, tiny_space):
    result = run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=5", "search.workers=2"))
    assert result.exit_code == 0
    _check_exact(result.study, f"sqlite:///{in_tmp}/outputs/mlflow.db", 5)


def test_two_workers_share_a_postgresql_study(in_tmp, tiny_space):
    url = os.environ.get("NAS_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide a PostgreSQL server: .ci/run starts one and sets NAS_TEST_POSTGRES_URL")
        pytest.skip("no PostgreSQL server here: set NAS_TEST_POSTGRES_URL=postgresql://user:pw@127.0.0.1/db")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    result = run_search(
        compose_cfg(
            f"+space={tiny_space}", *FAST, "trials=4", "search.workers=2", f"study.storage={url}", f"study.name={name}"
        )
    )
    assert result.exit_code == 0
    study = optuna.load_study(study_name=name, storage=url)
    _check_exact(study, f"sqlite:///{in_tmp}/outputs/mlflow.db", 4)
