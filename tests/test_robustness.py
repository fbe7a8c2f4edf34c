"""Nothing lost: signals, killed workers, failing trials and bad input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from nas.errors import NasError
from nas.search.runner import EXIT_TOO_MANY_FAILURES, run_search
from tests.conftest import FAST, HANG_S, TINY_SPACE, compose_cfg, mlflow_server, subprocess_env, write_image_folder


def _study(cwd: Path, name: str = "tiny-digits") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/outputs/optuna.db")


def _runs(cwd: Path, name: str = "tiny-digits"):
    client = MlflowClient(f"sqlite:///{cwd}/outputs/mlflow.db")
    return client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)


def _start(cwd: Path, space: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.search", f"+space={space}", *FAST, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or subprocess_env(),
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc, lines


def _rerun(cwd: Path, space: Path, *args: str) -> subprocess.CompletedProcess:
    """The same command again, to completion: what a user does to resume."""
    cmd = [sys.executable, "-m", "nas.search", f"+space={space}", *FAST, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=subprocess_env(), timeout=HANG_S)


def _wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout: float = HANG_S) -> None:
    deadline = time.time() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None, f"search exited early: {proc.stderr.read()}"
        assert time.time() < deadline, f"no {text!r} after {timeout}s: {lines}"
        time.sleep(0.2)


# One signal per command (the handler is shared, nas.interrupts): Ctrl-C here, SIGTERM for the retrain below.
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130)])
def test_signal_mid_trial_records_it_and_rerun_resumes(tmp_path, tiny_space, sig, code):
    slow = ("train.epochs=3", "data.repeat=4", "search.pruner=none")
    proc, lines = _start(tmp_path, tiny_space, "trials=5", *slow, "search.progress_s=0")
    _wait_for(lines, "      trial 1 epoch 1/3: ", proc)  # the second trial is training now
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=HANG_S)[1]
    assert proc.returncode == code
    assert f"interrupted by {sig.name}: trial 1 recorded as failed" in stderr
    assert "Rerun the same command to resume" in stderr and "Traceback" not in stderr
    study = _study(tmp_path)
    states = {t.number: t.state for t in study.trials}
    assert states[0] == TrialState.COMPLETE and states[1] == TrialState.FAIL
    assert study.trials[1].user_attrs["fail_reason"] == f"interrupted by {sig.name}"
    runs = {r.data.tags.get("optuna.trial_number"): r for r in _runs(tmp_path)}
    assert runs["1"].info.status == "KILLED" and runs["0"].info.status == "FINISHED"
    assert runs[None].info.status == "KILLED"  # the study's parent run
    first_value = study.trials[0].value

    done = _rerun(tmp_path, tiny_space, "trials=2", *slow)  # the same recipe: another one would be refused
    assert done.returncode == 0, done.stderr
    study = _study(tmp_path)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 and complete[0].number == 0 and complete[0].value == first_value
    assert all(r.info.status != "RUNNING" for r in _runs(tmp_path))


def test_sigkill_then_immediate_rerun_retries_the_stale_trial_and_closes_its_run(tmp_path, tiny_space):
    """Rerun at once, while the killed trial's heartbeat is still fresh: the rerun trains other networks,
    Optuna fails the trial once its heartbeat goes stale, the rerun closes its MLflow run and retries it."""
    # Trials of ~10 s and a 10 s grace period: the rerun starts (~7 s) before the heartbeat is stale and
    # notices it after its first trial (a slower start-up only moves the sweep to start-up).
    slow = ("train.epochs=3", "data.repeat=16", "search/pruner=none", "search.heartbeat_s=5")
    proc, lines = _start(tmp_path, tiny_space, "trials=3", *slow, "search.progress_s=0")
    _wait_for(lines, "      trial 1 epoch 1/3: ", proc)  # the second trial is training now
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    study = _study(tmp_path)
    killed = next(t for t in study.trials if t.state == TrialState.RUNNING)
    assert {r.info.status for r in _runs(tmp_path) if r.data.tags.get("optuna.trial_number") == str(killed.number)} == {
        "RUNNING"
    }
    done = _rerun(tmp_path, tiny_space, "trials=3", *slow)
    assert done.returncode == 0, done.stderr
    assert "waiting for" not in done.stdout  # it did not sit out the grace period at the end
    study = _study(tmp_path)
    assert study.trials[killed.number].state == TrialState.FAIL
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    # The stale trial was re-queued with the same architecture, and no completed trial ran twice.
    archs = [t.user_attrs["arch"] for t in complete]
    assert killed.user_attrs["arch"] in archs and len(set(archs)) == 3
    runs = _runs(tmp_path)
    stale = [r for r in runs if r.data.tags.get("optuna.trial_number") == str(killed.number)]
    assert stale[0].info.status == "KILLED" and stale[0].data.tags["nas.state"] == "killed"
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_failed_trials_network_is_freed_before_the_next_trial_trains(in_tmp, tiny_space, monkeypatch):
    """Through the command's entry point: nothing of a failed trial (its network, trainer, graph) may still be
    alive when the next trial starts training, or one out-of-memory error cascades into the next trials."""
    import weakref

    import nas.search.objective as objective
    import nas.train.run as run
    from nas.search.__main__ import main

    networks: list[weakref.ref] = []
    make_module = run.make_module
    monkeypatch.setattr(
        run, "make_module", lambda *a, **k: networks.append(weakref.ref(m := make_module(*a, **k))) or m
    )
    alive_when_training: list[int] = []
    train_arch = objective.train_arch

    def train(*args, **kwargs):
        alive_when_training.append(sum(ref() is not None for ref in networks))
        return train_arch(*args, **kwargs)

    monkeypatch.setattr(objective, "train_arch", train)
    assert main(compose_cfg(f"+space={tiny_space}", *FAST, "trials=2", "+search.inject_faults={0: oom, 1: error}")) == 0
    assert alive_when_training == [0, 0, 0, 0]  # two failed trials, then two trained: never one left over


def test_tracking_server_down_mid_search_is_recorded_and_ends_in_one_clear_line(tmp_path, tiny_space):
    # MLflow's client retries a lost server for minutes by default; the README says how to shorten that.
    env = subprocess_env() | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    with mlflow_server(tmp_path) as (server, base):
        args = ("trials=4", f"mlflow.tracking_uri={base}", "search.max_consecutive_failures=2")
        proc, lines = _start(tmp_path, tiny_space, *args, env=env)
        _wait_for(lines, "[1/4] trial", proc)
        server.terminate()
        server.wait(timeout=30)
        stderr = proc.communicate(timeout=HANG_S)[1]
    assert proc.returncode == EXIT_TOO_MANY_FAILURES, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped after 2 consecutive failed trials" in errors[0]
    assert f"MLflow tracking at {base} failed" in errors[0]
    assert "the study's results are in sqlite:///outputs/optuna.db" in errors[0]
    study = _study(tmp_path)
    assert study.trials[0].state == TrialState.COMPLETE  # recorded while the server was up
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 2 and all(f"MLflow tracking at {base} failed" in t.user_attrs["fail_reason"] for t in failed)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


def test_oom_and_nan_trials_are_recorded_and_the_search_goes_on(in_tmp, tiny_space):
    cfg = compose_cfg(f"+space={tiny_space}", *FAST, "trials=3", "+search.inject_faults={1: oom, 2: nonfinite}")
    result = run_search(cfg)
    assert result.exit_code == 0
    trials = result.study.trials
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["fail_reason"].startswith("out of memory")
    assert trials[2].state == TrialState.FAIL and trials[2].user_attrs["fail_reason"].startswith("non-finite loss")
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    runs = {r.data.tags.get("optuna.trial_number"): r for r in _runs(in_tmp)}
    assert runs["1"].info.status == "FAILED" and runs["1"].data.tags["nas.state"] == "failed"
    assert "out of memory" in runs["1"].data.tags["nas.fail_reason"]
    assert "non-finite" in runs["2"].data.tags["nas.fail_reason"]


def test_unbuildable_architecture_is_recorded_and_the_search_goes_on(in_tmp, tiny_space):
    """A space may allow a network torch cannot build: 2**31 channels overflow a weight's storage size
    (a real error from torch, on any machine). The trial that draws it fails with torch's reason."""
    tiny_space.write_text(TINY_SPACE.replace("{channels: 24, stride: 2", "{channels: [24, 2147483648], stride: 2"))
    cfg = compose_cfg(f"+space={tiny_space}", *FAST, "trials=1")
    assert run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=0")).exit_code == 0
    study = _study(in_tmp)
    study.enqueue_trial({"s1.channels": 2147483648})
    study.enqueue_trial({"s1.channels": 24})
    result = run_search(cfg)
    first, second = result.study.trials
    assert first.params["s1.channels"] == 2147483648
    assert first.state == TrialState.FAIL and "Storage size calculation overflowed" in first.user_attrs["fail_reason"]
    assert second.state == TrialState.COMPLETE
    run = next(r for r in _runs(in_tmp) if r.data.tags.get("optuna.trial_number") == "0")
    assert run.info.status == "FAILED" and "Storage size calculation overflowed" in run.data.tags["nas.fail_reason"]


def test_consecutive_failures_stop_the_search_early(in_tmp, tiny_space, capsys):
    cfg = compose_cfg(
        f"+space={tiny_space}",
        *FAST,
        "trials=10",
        "search.max_consecutive_failures=2",
        "+search.inject_faults={0: error, 1: error, 2: error}",
    )
    result = run_search(cfg)
    assert result.exit_code == EXIT_TOO_MANY_FAILURES
    assert len(result.study.trials) == 2
    assert "stopped after 2 consecutive failed trials" in result.message and "injected fault" in result.message


def test_zero_max_consecutive_failures_means_never_stop(in_tmp, tiny_space):
    cfg = compose_cfg(f"+space={tiny_space}", *FAST, "trials=1", "search.max_consecutive_failures=0",
                      "+search.inject_faults={0: error, 1: error, 2: error}")  # fmt: skip
    result = run_search(cfg)
    assert result.exit_code == 0
    assert [t.state for t in result.study.trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE]


def test_a_trial_left_without_any_heartbeat_does_not_block_reruns(tmp_path, tiny_space):
    """A process killed between ask() and its first heartbeat leaves a RUNNING trial Optuna never reclaims."""
    assert _rerun(tmp_path, tiny_space, "trials=0").returncode == 0
    orphan = _study(tmp_path).ask()  # a storage without heartbeats: the trial never gets one
    done = _rerun(tmp_path, tiny_space, "trials=1", "search.heartbeat_s=1")  # times out (fails) if it waits for ever
    assert done.returncode == 0, done.stderr
    assert f"trial {orphan.number} made no progress for" in done.stdout
    assert "it is failed and retried in 2 s" in done.stdout
    study = _study(tmp_path)
    assert study.trials[orphan.number].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 1


def test_workers_started_by_hand_draw_different_sequences(monkeypatch):
    from nas.search.study import make_sampler, with_group_files, worker_index

    cfg = with_group_files(compose_cfg("search.role=worker", "search.sampler=random"))
    draws = []
    for pid in (4242, 4243):  # two hand-started workers (other hosts or processes), no index given
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        study = optuna.create_study(sampler=make_sampler(cfg))
        draws.append([study.ask().suggest_float("x", 0, 1) for _ in range(3)])
        assert worker_index(cfg) > 0
    assert draws[0] != draws[1]
    assert worker_index(compose_cfg("search.role=worker", "search.worker_index=3")) == 3
    assert worker_index(compose_cfg()) == 0


def test_resuming_with_another_space_is_refused(in_tmp, tiny_space):
    run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=0", "study.name=s"))
    other = tiny_space.parent / "other.yaml"
    other.write_text(TINY_SPACE.replace("width: [0.25, 0.5]", "width: [0.75]"))
    with pytest.raises(NasError, match=r"study 's' was created with a different setup \(space: 'tiny' -> 'other'"):
        run_search(compose_cfg(f"+space={other}", *FAST, "trials=1", "study.name=s"))
    with pytest.raises(NasError, match=r"objective: 'accuracy' -> 'mnas'"):
        run_search(
            compose_cfg(
                f"+space={tiny_space}",
                *FAST,
                "trials=1",
                "study.name=s",
                "search.objective=mnas",
                "latency.budget_ms=100",
            )
        )
    for change, refusal in (
        ("train/optimizer=adamw", "optimizer: 'torch.optim.SGD' -> 'torch.optim.AdamW'"),
        ("train/schedule=onecycle", "schedule: 'nas.train.schedules.cosine' -> 'nas.train.schedules.one_cycle'"),
        ("latency.budget_ms=100", "budget_ms: None -> 100.0"),
        ("latency.batch_size=4", "latency_batch: 1 -> 4"),
        (f"data=imagefolder data.root={write_image_folder(in_tmp / 'imgs')}", "data: 'digits' -> 'imagefolder'"),
    ):
        with pytest.raises(NasError, match=re.escape(refusal)):
            run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=1", "study.name=s", *change.split()))
    assert len(_study(in_tmp, "s").trials) == 0  # nothing half-written
    assert run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=1", "study.name=s")).exit_code == 0


def _bad_space(tmp: Path, text: str) -> str:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return f"+space={path}"


def _sampler_file(tmp: Path) -> Path:
    folder = tmp / "conf" / "search" / "sampler"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "typo.yaml").write_text("_target_: optuna.samplers.NoSuchSampler\n")
    return tmp / "conf"


BAD_INPUT = [
    ("no space", lambda t: [], "choose a search space with +space=NAME; available in search_spaces/: mbv2, mbv3"),
    (
        "unknown space",
        lambda t: ["+space=nope"],
        "unknown search space 'nope'; available: mbv2, mbv3, mbv3_224, mbv3_small",
    ),
    ("malformed YAML", lambda t: [_bad_space(t, "width: [0.5\nstem: {")], "bad.yaml: malformed YAML (line"),
    (
        "kernel 4",
        lambda t: [_bad_space(t, TINY_SPACE.replace("kernel: [3, 5]", "kernel: [3, 4]"))],
        "bad.yaml: block.kernel: 4 is not allowed; expected a depthwise kernel size in {3, 5, 7}",
    ),
    (
        "expansion 0",
        lambda t: [_bad_space(t, TINY_SPACE.replace("expansion: [2, 3]", "expansion: [0]"))],
        "bad.yaml: block.expansion: 0 is not allowed; expected a number >= 1",
    ),
    (
        "unknown activation",
        lambda t: [_bad_space(t, TINY_SPACE.replace("[relu, hswish]", "[relu, gelu]"))],
        "bad.yaml: block.activation: 'gelu' is not allowed; expected one of relu, relu6, hswish",
    ),
    ("trials=-1", lambda t: ["+space=mbv3", "trials=-1"], "trials=-1 must be a whole number >= 0"),
    ("trials=abc", lambda t: ["+space=mbv3", "trials=abc"], "trials='abc' must be a whole number >= 0"),
    (
        "draws_per_trial=0",
        lambda t: ["+space=mbv3", "search.draws_per_trial=0"],
        "search.draws_per_trial=0 must be a whole number >= 1 (draws one trial may refuse",
    ),
    (
        "join_timeout_s=-1",
        lambda t: ["+space=mbv3", "search.join_timeout_s=-1"],
        "search.join_timeout_s=-1 must be seconds >= 0 (how long a worker waits for the main process",
    ),
    (
        "impossible budget",
        lambda t: [_bad_space(t, TINY_SPACE), "latency.budget_ms=0.00001"],
        "latency.budget_ms=1e-05 cannot be met: the cheapest network of space bad takes",
    ),
    (
        "unreachable storage",
        lambda t: ["+space=mbv3", "study.storage=postgresql://nas:s3cret@127.0.0.1:9/optuna"],
        "cannot open the study storage postgresql://nas:***@127.0.0.1:9/optuna",
    ),
    (
        "unreachable MLflow",
        lambda t: ["+space=mbv3", "mlflow.tracking_uri=http://127.0.0.1:9"],
        "MLflow tracking server http://127.0.0.1:9 is unreachable",
    ),
    (
        "missing data offline",
        lambda t: ["+space=mbv3", "data=cifar10", f"data.root={t}/none", "data.download=false"],
        "data set CIFAR-10 not found in",
    ),
    (
        "sampler file that cannot be made",
        lambda t: ["+space=mbv3", f"hydra.searchpath=[file://{_sampler_file(t)}]", "search/sampler=typo"],
        "search.sampler: cannot create optuna.samplers.NoSuchSampler",
    ),
    (
        "bad sampler",
        lambda t: ["+space=mbv3", "search.sampler=cmaes"],
        "search.sampler='cmaes' is not one of gp, nsga2, random, tpe; add a file search/sampler/cmaes.yaml",
    ),
]


@pytest.mark.parametrize(("case", "args", "message"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_clear_line(in_tmp, capsys, case, args, message):
    """The command's own code path (Hydra composition, then the entry point), in-process for speed."""
    from nas.search.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(compose_cfg(*FAST, *args(in_tmp)))
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in out + err and "s3cret" not in out + err
    db = in_tmp / "outputs" / "optuna.db"
    if db.exists():  # nothing half-written: no study was created that a corrected rerun would trip over
        assert optuna.get_all_study_names(f"sqlite:///{db}") == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["trials=2", "latency.budget_ms=0.0001", "search.precheck_budget=false", "search.max_draws_over_budget=2"],
         3, "error: no architecture met the latency budget of 0.0001 ms in the last 2 draws"),
        (["trials=2", "search.max_consecutive_failures=1", "+search.inject_faults={0: error}"],
         4, "error: stopped after 1 consecutive failed trials"),
    ],
)  # fmt: skip
def test_search_stops_through_the_real_command_with_its_exit_code(tmp_path, tiny_space, args, code, message):
    """Exit 3 (nothing feasible) and 4 (too many failures), as a shell script sees them."""
    proc = subprocess.run(
        [sys.executable, "-m", "nas.search", f"+space={tiny_space}", *FAST, *args],
        capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=HANG_S,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: choose a search space with +space=NAME; available in search_spaces/: mbv2, mbv3"),
        (
            ["+space=mbv3", "study.storage=postgresql://nas:s3cret@127.0.0.1:9/optuna"],
            "error: cannot open the study storage postgresql://nas:***@127.0.0.1:9/optuna",
        ),
    ],
)
def test_bad_input_through_the_real_command(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "nas.search", *FAST, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=HANG_S,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and "s3cret" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143)])
def test_a_retrain_says_what_it_does_and_a_signal_stops_it_with_one_line(in_tmp, tiny_space, capsys, sig, code):
    """Issue 32, items 1-3: the search's summary names a short retrain and the full one, with their length at
    the trials' pace; trials show epoch lines (search.progress_s=0: every epoch); the retrain prints what it
    trains, on what and for how long, then a line per epoch (not a terminal); a signal stops it with one line,
    its run KILLED, nothing registered, exit 130/143 (never 0)."""
    result = run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=1", "search.progress_s=0"))
    out = capsys.readouterr().out
    assert "      trial 0 epoch 1/1: train_loss " in out and "val_acc" in out
    command = "python -m nas.retrain study.name=tiny-digits data=digits train/optimizer=sgd train/schedule=cosine"
    short = f"{command} train.batch_size=64 train.epochs=1 retrain.register=false   (1 epoch, about "
    assert f"try a retrain: {short}" in out
    assert f"retrain best:  {command} train.batch_size=64   (the full recipe: 200 epochs, about " in out
    cmd = [sys.executable, "-m", "nas.retrain", *FAST, "train.epochs=40", "retrain.export=false"]
    proc = subprocess.Popen(cmd, cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    _wait_for(lines, "  epoch 1/40: train_loss ", proc)
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=HANG_S)[1]
    assert proc.returncode == code, stderr[-2000:]
    trial = result.study.trials[0]
    assert lines[0] == f"retraining trial 0 of study tiny-digits: {trial.user_attrs['arch']}\n"
    assert re.match(r"  0\.\d\d M params, .* data digits: 1438 train\+val / 359 test images; 40 epochs of batch 64; "
                    r"MLflow sqlite:///outputs/mlflow\.db run \w+\n", lines[1]), lines[1]  # fmt: skip
    assert re.match(r"  about \d+ (s|min) at the search trial's pace \(\d+\.\d s per epoch\)", lines[2]), lines[2]
    assert f"interrupted by {sig.name}: the retrain stopped before it finished; its MLflow run is marked KILLED" in (
        stderr
    )
    assert "Traceback" not in stderr
    retrains = [r for r in _runs(in_tmp) if r.data.tags.get("nas.kind") == "retrain"]
    assert [r.info.status for r in retrains] == ["KILLED"]
    assert MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db").search_registered_models() == []
