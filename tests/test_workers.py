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
                                    f"latency.budget_ms={budget}"))  # fmt: skip
    assert result.exit_code == 0
    _check_exact(result.study, f"sqlite:///{in_tmp}/outputs/mlflow.db", 5)
    assert any(t.user_attrs.get("state") == "infeasible" for t in result.study.trials)


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
