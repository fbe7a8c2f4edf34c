"""The MLflow UI in a real browser: headless Chromium shows the study's runs and a trial's metrics."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from nas.search.runner import run_search
from tests.conftest import FAST, compose_cfg, mlflow_api, mlflow_ui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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


def test_mlflow_ui_shows_the_study_in_chromium(in_tmp, tiny_space):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Chromium (.ci/run installs Debian's chromium)")
        pytest.skip("Chromium is not installed here (apt-get install chromium)")
    run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=2"))
    with mlflow_ui(in_tmp, "tiny-digits") as (base, exp):
        runs_page = _browser(f"{base}/#/experiments/{exp}/runs", in_tmp, "--dump-dom")
        assert ">tiny-digits<" in runs_page  # the study's parent run, trials nested under it
        trial = mlflow_api(base, "runs/search", {"experiment_ids": [exp], "filter": "attributes.run_name = 'trial-1'"})
        run_id = trial["runs"][0]["info"]["run_id"]
        run_page = _browser(f"{base}/#/experiments/{exp}/runs/{run_id}", in_tmp, "--dump-dom")
        for text in ("trial-1", "val_acc", "latency_ms"):
            assert text in run_page
        shot = in_tmp / "ui.png"
        _browser(f"{base}/#/experiments/{exp}/runs", in_tmp, f"--screenshot={shot}")
        assert shot.stat().st_size > 20_000
