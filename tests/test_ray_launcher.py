"""The search's workers scheduled by Ray (``search.launcher=ray``, issue 31): a real two-node Ray cluster on this
machine (Ray's own ``ray.cluster_utils.Cluster``), PostgreSQL and an MLflow server; and the refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from nas.errors import NasError
from nas.search.launchers import LocalLauncher, make_launcher
from nas.search.ray_launcher import RayLauncher, file_stores, other_machines
from nas.search.study import with_group_files
from tests.conftest import AUTH_PASSWORD, FAST, HANG_S, compose_cfg, mlflow_server, subprocess_env

RAY_FAST = (*FAST, "latency.estimator=table", "latency.calibrate=2")


def _postgres_url() -> str:
    url = os.environ.get("NAS_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide a PostgreSQL server: .ci/run starts one and sets NAS_TEST_POSTGRES_URL")
        pytest.skip("no PostgreSQL server here: set NAS_TEST_POSTGRES_URL=postgresql://user:pw@127.0.0.1/db")
    return url


def _launcher(*overrides: str):
    cfg = with_group_files(compose_cfg(*overrides))
    return cfg, make_launcher(cfg)


def test_the_launcher_is_a_config_group_with_a_short_spelling_and_checked_arguments():
    assert isinstance(_launcher()[1], LocalLauncher)
    cfg, launcher = _launcher("search.launcher=ray", "search.workers=3")
    assert isinstance(launcher, RayLauncher) and launcher.address == "auto" and launcher.max_restarts == 2
    assert [p.index for p in launcher.plan(cfg)] == [0, 1, 2]
    _, launcher = _launcher("search/launcher=ray", "search.launcher.address=ray://head:10001")
    assert launcher.address == "ray://head:10001"
    with pytest.raises(NasError, match=r"search\.launcher\.max_restarts=-1 must be a whole number >= 0"):
        _launcher("search/launcher=ray", "search.launcher.max_restarts=-1")
    with pytest.raises(NasError, match=r"search\.launcher\.address=6379 must be auto, HOST:PORT"):
        _launcher("search/launcher=ray", "search.launcher.address=6379")
    with pytest.raises(NasError, match=r"search\.launcher='slurm' is not one of local, ray"):
        _launcher("search.launcher=slurm")
    cfg, launcher = _launcher("search.launcher=ray", "search.gpus=all")
    with pytest.raises(NasError, match=r"search\.gpus picks GPUs of this machine"):
        launcher.plan(cfg)


def test_ray_workers_never_measure_where_they_train():
    cfg, launcher = _launcher("search.launcher=ray", "latency.estimator=measure")
    with pytest.raises(NasError, match=r"cannot measure latency where they train: use the lookup table"):
        launcher.check(cfg, launcher.plan(cfg))


def test_file_stores_are_named_and_nodes_on_other_machines_are_found():
    cfg = compose_cfg()
    assert file_stores(cfg) == ["study.storage=sqlite:///outputs/optuna.db", "mlflow.tracking_uri=" +
                                str(cfg.mlflow.tracking_uri)]  # fmt: skip
    remote = compose_cfg("study.storage=postgresql://nas:pw@db/optuna", "mlflow.tracking_uri=http://mlflow:5000")
    assert file_stores(remote) == []
    nodes = [{"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.1"},
             {"NodeID": "b", "Alive": True, "NodeManagerAddress": "10.0.0.1"},
             {"NodeID": "c", "Alive": True, "NodeManagerAddress": "10.0.0.7"},
             {"NodeID": "d", "Alive": False, "NodeManagerAddress": "10.0.0.9"}]  # fmt: skip
    assert other_machines(nodes, "a") == ["10.0.0.7"]  # b shares this machine; d is dead
    assert other_machines(nodes[:2], "b") == []
    assert other_machines(nodes, None) == ["10.0.0.1", "10.0.0.7"]  # Ray Client: this process is on no node


def test_a_sqlite_study_is_refused_when_the_cluster_has_nodes_on_other_machines(monkeypatch):
    cfg, launcher = _launcher("search.launcher=ray", "latency.estimator=table")
    nodes = [{"NodeID": "here", "Alive": True, "NodeManagerAddress": "10.0.0.1"},
             {"NodeID": "gpu-box", "Alive": True, "NodeManagerAddress": "10.0.0.7"}]  # fmt: skip
    cluster = SimpleNamespace(
        nodes=lambda: nodes,
        get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "here"),
        cluster_resources=lambda: {"CPU": 8.0},
    )  # what RayLauncher asks of a connected cluster
    monkeypatch.setattr(launcher, "_connect", lambda: cluster)
    with pytest.raises(NasError) as refused:
        launcher.check(cfg, launcher.plan(cfg))
    message = str(refused.value)
    assert "study.storage=sqlite:///outputs/optuna.db" in message and "(10.0.0.7)" in message
    assert "use PostgreSQL" in message and "\n" not in message
    nodes[1]["NodeManagerAddress"] = "10.0.0.1"  # every node on this machine: the file is reachable
    launcher.check(cfg, launcher.plan(cfg))


def _search_cli(tmp: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas.search", *args], cwd=tmp, capture_output=True, text=True,
                          env=env or subprocess_env(), timeout=HANG_S)  # fmt: skip


def test_without_ray_or_without_a_cluster_the_command_stops_with_one_line(tmp_path, tiny_space):
    args = (f"+space={tiny_space}", *RAY_FAST, "trials=2", "search.workers=2")
    shadow = tmp_path / "shadow" / "ray"  # a Python where `import ray` fails, as without the extra
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = subprocess_env() | {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = _search_cli(tmp_path, *args, "search.launcher=ray", env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: search.launcher=ray needs Ray on this machine and every node: pip install -e '.[ray]'"
    ]
    pytest.importorskip("ray")
    proc = _search_cli(tmp_path, *args, "search/launcher=ray", "search.launcher.address=127.0.0.1:9")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Ray cluster at 127.0.0.1:9: "), lines
    assert "ray start --head" in lines[0]
    assert not (tmp_path / "outputs" / "optuna.db").exists()  # refused before the study was made


@pytest.fixture
def two_node_cluster():
    """A Ray head with 2 CPUs and a second node with 1, as separate raylets on this machine."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, second
    finally:
        cluster.shutdown()


def _wait_for_a_trial_on(study_name: str, url: str, node_id: str, proc: subprocess.Popen) -> int:
    """The number of the first trial that trains on ``node_id`` once it is under way."""
    deadline, storage = time.time() + HANG_S, optuna.storages.RDBStorage(url)  # one connection pool for the polls
    while time.time() < deadline and proc.poll() is None:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:  # not created yet
            time.sleep(0.5)
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker_node") == node_id:
                return t.number
        time.sleep(0.2)
    pytest.fail(f"no trial ran on the second node (search exited {proc.poll()})")


def test_ray_workers_on_two_nodes_train_exactly_the_trials_and_a_lost_nodes_trial_is_retried(
    in_tmp, tiny_space, two_node_cluster, monkeypatch
):
    """Done-when of issue 31: 4 networks trained by 2 workers that Ray placed on both nodes, the worker runs nested
    under the study run; the second node is killed mid-trial: its worker is started again through Ray, its trial
    retried through the heartbeat, and the study still ends with exactly 4 trained networks, none twice.
    Passwords (PostgreSQL's, the MLflow server's) reach the workers and nothing Ray records."""
    cluster, second = two_node_cluster
    url = _postgres_url()
    parts = urlsplit(url)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@")))
    name = f"ray-{uuid.uuid4().hex[:8]}"
    with mlflow_server(in_tmp, auth=True) as (_, base):
        env = subprocess_env() | {"PGPASSWORD": parts.password or "", "MLFLOW_TRACKING_USERNAME": "admin",
                                  "MLFLOW_TRACKING_PASSWORD": AUTH_PASSWORD}  # fmt: skip
        cmd = [sys.executable, "-m", "nas.search", f"+space={tiny_space}", *RAY_FAST, "trials=4", "train.epochs=2",
               "search/launcher=ray", f"search.launcher.address={cluster.address}", "search.workers=2",
               f"study.storage={bare}", f"study.name={name}", f"mlflow.tracking_uri={base}",
               "search.heartbeat_s=2", "search.finalists=1", "search.finalist_seeds=2", "search.fidelity_sample=0",
               "search.finalist_epochs=1"]  # fmt: skip
        out, err = in_tmp / "search.out", in_tmp / "search.err"
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.Popen(cmd, cwd=in_tmp, stdout=o, stderr=e, env=env)
            killed = _wait_for_a_trial_on(name, url, second.node_id, proc)
            cluster.remove_node(second)  # the node and every process on it, mid-trial
            proc.wait(timeout=HANG_S)
        stdout, stderr = out.read_text(), err.read_text()
        assert proc.returncode == 0, stdout + stderr
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", AUTH_PASSWORD)
        client = MlflowClient(base)
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=100)
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    trained = [t for t in trials if t.user_attrs.get("state") == "complete"]
    assert len(trained) == 4
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    lost = trials[killed]
    assert lost.state == TrialState.FAIL and lost.user_attrs.get("state") != "complete"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retries and any(t.user_attrs.get("state") == "complete" for t in retries)  # trained, by a live worker
    assert {t.user_attrs.get("worker_node") for t in trials} >= {second.node_id, cluster.head_node.node_id}
    # One nested run per trained network under the one study run.
    parent = [r for r in runs if r.data.tags.get("nas.kind") == "study"]
    trial_runs = [r for r in runs if r.data.tags.get("nas.kind") == "trial" and r.data.tags["nas.state"] == "complete"]
    assert len(parent) == 1
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs) == [t.number for t in trained]
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent[0].info.run_id}
    # The finalist round's runs were trained by Ray's workers too: the winner's two seeds.
    round_ = study.user_attrs["finalist_round"]
    assert [c["runs"] for c in round_["candidates"]] == [2] and "starting 2 workers through Ray" in stdout
    assert stdout.count("starting 2 workers through Ray") == 2  # the search, then the round
    # The lost worker was named, started again, and its lines came through prefixed as a local worker's.
    assert "starting 2 workers through Ray" in stdout
    assert "died (" in stderr and "starting it again through Ray (1/2)" in stderr
    assert "worker 0 died" in stdout or "worker 1 died" in stdout
    assert "[worker 0] started on node" in stderr and "[worker 1] started on node" in stderr
    # Nothing Ray records holds the MLflow password: its session's logs, nor what the search printed.
    session = Path(cluster.head_node.get_session_dir_path())
    leaked = [str(p) for p in session.rglob("*") if p.is_file() and AUTH_PASSWORD.encode() in p.read_bytes()]
    assert not leaked and AUTH_PASSWORD not in stdout + stderr
