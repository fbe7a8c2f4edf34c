"""The MLflow UI in a real browser: headless Chromium shows the study's runs and a trial's metrics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from nas.search.runner import run_search
from tests.conftest import compose_cfg, subprocess_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FAST = (
    "data=digits",
    "train.epochs=1",
    "data.repeat=1",
    "train.batch_size=64",
    "latency.device=cpu",
    "latency.repeats=5",
    "latency.warmup=2",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
    "--virtual-time-budget=30000",
]


def _browser(url: str, tmp, *action: str) -> str:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *action, url], capture_output=True, text=True, timeout=180
    )
    return proc.stdout


def _api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def test_mlflow_ui_shows_the_study_in_chromium(in_tmp, tiny_space):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Chromium (.ci/run installs Debian's chromium)")
        pytest.skip("Chromium is not installed here (apt-get install chromium)")
    run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=2"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            "sqlite:///outputs/mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=in_tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                exp = _api(base, "experiments/get-by-name?experiment_name=tiny-digits")["experiment"]["experiment_id"]
                break
            except OSError:
                assert time.time() < deadline, "mlflow ui did not start"
                time.sleep(1)
        runs_page = _browser(f"{base}/#/experiments/{exp}/runs", in_tmp, "--dump-dom")
        assert ">tiny-digits<" in runs_page  # the study's parent run, trials nested under it
        trial = _api(base, "runs/search", {"experiment_ids": [exp], "filter": "attributes.run_name = 'trial-1'"})
        run_id = trial["runs"][0]["info"]["run_id"]
        run_page = _browser(f"{base}/#/experiments/{exp}/runs/{run_id}", in_tmp, "--dump-dom")
        for text in ("trial-1", "val_acc", "latency_ms"):
            assert text in run_page
        shot = in_tmp / "ui.png"
        _browser(f"{base}/#/experiments/{exp}/runs?{urllib.parse.urlencode({'x': 1})}", in_tmp, f"--screenshot={shot}")
        assert shot.stat().st_size > 20_000
    finally:
        server.terminate()
        server.wait(timeout=30)
