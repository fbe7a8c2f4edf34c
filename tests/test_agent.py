"""Latency measured on the deployment device (issue 27): a real agent process on 127.0.0.1, the refusals it
answers, and a search whose every latency figure comes from it."""

from __future__ import annotations

import base64
import json
import pickle
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from nas.errors import NasError
from nas.latency.agent import TOKEN_ENV
from nas.latency.onnx_runtimes import OnnxRuntime
from nas.models import build
from nas.onnx_export import export_onnx_file
from nas.space import decode
from tests.conftest import FAST, HANG_S, ROOT, TINY_ARCH, subprocess_env

TOKEN = "agent-test-token-0123456789"
TRAINING_STACK = ("torch", "optuna", "mlflow", "lightning", "hydra", "omegaconf", "torchvision")


def _start_agent(env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str]:
    agent = subprocess.Popen([sys.executable, "-m", "nas.latency", "agent", "--port", "0", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = agent.stdout.readline()  # its first line names the port it listens on
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert match, line + agent.stderr.read()[-2000:] if agent.poll() is not None else line
    return agent, f"http://127.0.0.1:{match.group(1)}"


def _stop(agent: subprocess.Popen) -> None:
    agent.terminate()
    agent.wait(timeout=HANG_S)


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    process, url = _start_agent(subprocess_env())
    yield url
    _stop(process)


def _post(url: str, body: bytes, token: str = TOKEN) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _status(url: str) -> dict:
    request = urllib.request.Request(f"{url}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=HANG_S) as answer:
        return json.loads(answer.read())


def test_the_agent_runs_without_the_training_stack_and_refuses_what_it_must(tmp_path):
    """On a board with numpy and ONNX Runtime only: torch, Optuna, MLflow, Lightning and Hydra cannot be
    imported there (shadowed here), and the agent still measures; what it must not take it refuses, and goes
    on."""
    shadows = tmp_path / "shadows"
    for name in TRAINING_STACK:
        (shadows / name).mkdir(parents=True)
        (shadows / name / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
    env = {**subprocess_env(), TOKEN_ENV: TOKEN, "PYTHONPATH": f"{shadows}:{ROOT}"}
    agent, url = _start_agent(env, "--max-model-mb", "0.1")
    try:
        model = build(decode(TINY_ARCH), 10).eval()
        onnx_file = export_onnx_file(model, (1, 3, 16, 16), tmp_path / "m.onnx", "torchscript").read_bytes()
        request = {"runtime": "onnxruntime", "options": {"providers": ["CPUExecutionProvider"],
                   "optimization": "all"}, "shape": [1, 3, 16, 16], "threads": 1, "warmup": 1, "repeats": 4,
                   "max_cv": 10.0, "attempts": 3}  # fmt: skip
        body = {**request, "onnx": base64.b64encode(onnx_file).decode()}
        code, answer = _post(f"{url}/v1/measure", json.dumps(body).encode())
        assert code == 200, answer
        assert len(answer["takes"]) == 1 and len(answer["takes"][0]) == 4 and answer["measured"] == 1
        assert all(t > 0 for t in answer["takes"][0])

        def with_model(payload: bytes) -> bytes:
            return json.dumps({**request, "onnx": base64.b64encode(payload).decode()}).encode()

        refusals = {
            "token": _post(f"{url}/v1/measure", with_model(onnx_file), token="wrong"),
            "pickle": _post(f"{url}/v1/measure", with_model(pickle.dumps({"weights": [1.0]}))),
            "large": _post(f"{url}/v1/measure", with_model(b"\x08" + bytes(200_000))),  # 0.1 MB is its limit
            "json": _post(f"{url}/v1/measure", b"{not json"),
            "runtime": _post(f"{url}/v1/describe", json.dumps({"runtime": "tflite"}).encode()),
        }
        assert {k: c for k, (c, _) in refusals.items()} == {"token": 401, "pickle": 415, "large": 413,
                                                             "json": 400, "runtime": 400}  # fmt: skip
        assert "Authorization: Bearer $NAS_AGENT_TOKEN" in refusals["token"][1]["error"]
        assert "not an ONNX file" in refusals["pickle"][1]["error"]
        assert agent.poll() is None and _status(url)["measured"] == 1  # it goes on, nothing more measured
    finally:
        _stop(agent)
    assert TOKEN not in agent.stdout.read() + agent.stderr.read()  # its lines never show the token


def test_refusals_on_the_search_side_are_one_line(tmp_path, monkeypatch, agent):
    monkeypatch.setenv(TOKEN_ENV, "not-the-agent-token")
    with pytest.raises(NasError, match=r"refused the token: set NAS_AGENT_TOKEN to the agent's token"):
        OnnxRuntime(target=agent)
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(NasError, match=r"needs NAS_AGENT_TOKEN set to the agent's token"):
        OnnxRuntime(target=agent)


def _lines(proc: subprocess.Popen) -> list[str]:
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return lines


def _wait_for(lines: list[str], text: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + HANG_S
    while not any(text in line for line in lines):
        assert proc.poll() is None, f"search exited early: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {text!r} after {HANG_S}s: {lines}"
        time.sleep(0.2)


def test_a_search_measures_on_the_agent_and_resumes_after_it_was_killed(tmp_path, micro_space, monkeypatch):
    """Every latency figure of the study comes from the agent (its count of measurements is the study's); an
    agent that is not there stops the command before anything is measured; one killed mid-search fails the
    next trial with the reason, and the rerun with the agent back completes the study, no trial lost."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    env = subprocess_env()
    fast = [a for a in FAST if not a.startswith("train.epochs")]
    args = [sys.executable, "-m", "nas.search", f"+space={micro_space}", "trials=3", *fast, "train.epochs=2",
            "search/sampler=random", "search/pruner=none", "latency/runtime=onnxruntime",
            "search.enqueue_references=false", "latency.budget_ms=1000", "search.max_consecutive_failures=1",
            "search.progress_s=0"]  # fmt: skip
    gone = subprocess.run([*args, "latency.target=http://127.0.0.1:9"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=HANG_S)  # fmt: skip
    assert gone.returncode == 2, gone.stderr[-2000:]
    assert gone.stderr.strip().startswith("error: latency.target: the latency agent at http://127.0.0.1:9 does "
                                          "not answer"), gone.stderr[-2000:]  # fmt: skip
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    assert optuna.get_all_study_names(storage) == []  # nothing measured, no study made

    agent, url = _start_agent(env)
    search = subprocess.Popen([*args, f"latency.target={url}"], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    lines = _lines(search)
    _wait_for(lines, "      trial 0 epoch 1/2: ", search)  # the first network is measured and training
    agent.kill()
    agent.wait(timeout=HANG_S)
    stderr = search.communicate(timeout=HANG_S)[1]
    assert search.returncode == 4, stderr[-2000:]
    assert re.search(r"onnxruntime\[CPU\]@\S+", "".join(lines)), lines  # the device, named on the start line
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert [t.user_attrs.get("state") for t in trials] == ["complete", "failed"]
    assert trials[1].user_attrs["fail_reason"].startswith(f"the latency agent at {url} does not answer")
    first = (trials[0].user_attrs["arch"], trials[0].value)

    agent, url = _start_agent(env)  # back, on another port: the study is the device's, not the tunnel's
    try:
        done = subprocess.run([*args, f"latency.target={url}"], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=HANG_S)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        trials = optuna.load_study(study_name=name, storage=storage).trials
        complete = [t for t in trials if t.user_attrs.get("state") == "complete"]
        assert len(complete) == 3 and (complete[0].user_attrs["arch"], complete[0].value) == first
        assert len({t.number for t in complete}) == 3
        # This run's figures are all the agent's: the cheapest network's up-front check and two new trials.
        assert _status(url)["measured"] == 1 + 2
    finally:
        _stop(agent)


def test_a_table_built_through_the_agent_travels_and_the_draws_near_the_budget_are_measured_there(
    tmp_path,
    micro_space,
    agent,
):
    """The table estimator built through the agent into one file (latency.table=PATH), a search that predicts
    with that file, and latency.verify_band: the only measurements the search adds on the agent are those
    of the draws predicted near the budget."""
    env = subprocess_env()
    path = tmp_path / "tables" / "device.json"
    latency = ["latency/runtime=onnxruntime", f"latency.target={agent}", f"latency.table={path}",
               "latency.calibrate=2", "latency.repeats=5"]  # fmt: skip
    built = subprocess.run([sys.executable, "-m", "nas.latency", "build-table", f"+space={micro_space}",
                            "data=digits", *latency], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=HANG_S)  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    after_build = _status(agent)["measured"]
    entries = json.loads(path.read_text())["entries"]
    assert after_build == len(entries) + 2  # every layer and both calibration networks, all on the agent
    fast = [a for a in FAST if not a.startswith("latency.")]
    predictions = sorted(_predictions(path, micro_space, agent))
    assert _status(agent)["measured"] == after_build  # the file, used elsewhere as it is: nothing measured again
    budget = predictions[len(predictions) // 2]
    proc = subprocess.run([sys.executable, "-m", "nas.search", f"+space={micro_space}", "trials=2", *fast,
                           *latency, "latency.device=cpu", "latency.estimator=table", f"latency.budget_ms={budget}",
                           "latency.verify_band=0.5", "search.precheck_budget=false", "search/sampler=random",
                           "search.enqueue_references=false"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=HANG_S)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    verified = [t for t in trials if "latency_measured_ms" in t.user_attrs]
    refused = sum(t.user_attrs.get("refused_draws", {}).get("measured", 0) for t in trials)  # never trials
    assert all("latency_predicted_ms" in t.user_attrs for t in trials)
    assert _status(agent)["measured"] - after_build == len(verified) + refused  # the search measured those, there
    assert "draws predicted within ±50.0% of the budget are measured in onnxruntime[CPU]@" in proc.stdout


def _predictions(path: Path, space_file: Path, agent: str) -> list[float]:
    from nas.latency.measure import LatencySettings
    from nas.latency.table import LatencyTable, LayerModel, build_table
    from nas.space import load_space

    settings = LatencySettings(device="cpu", repeats=5, runtime=OnnxRuntime(target=agent))
    space = load_space(space_file)
    model: LayerModel = build_table(space, LatencyTable.at(path, settings), 10, 2, 0).model  # all from the file
    return [model.predict(space.sample(seed), 10) for seed in range(20)]
