"""The real command, then the MLflow UI on its database: REST API and headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FAST, HANG_S, TINY_SPACE, mlflow_api, mlflow_ui, subprocess_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000", "--virtual-time-budget=30000"]  # fmt: skip


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.CompletedProcess, str, str, Path]]:
    """``python -m nas.search`` run once, then ``mlflow ui`` serving its database."""
    folder = tmp_path_factory.mktemp("ui")
    space = folder / "tiny.yaml"
    space.write_text(TINY_SPACE)
    proc = subprocess.run(
        [sys.executable, "-m", "nas.search", f"+space={space}", "trials=2", *FAST],
        capture_output=True, text=True, cwd=folder, env=subprocess_env(), timeout=HANG_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with mlflow_ui(folder, "tiny-digits") as (base, exp):
        yield proc, base, exp, folder


def test_cli_search_output_and_runs_served(searched):
    proc, base, exp, _ = searched
    assert "[2/2] trial" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    page = f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert f"mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db, then open {page}" in proc.stdout
    tags = mlflow_api(base, f"experiments/get?experiment_id={exp}")["experiment"]["tags"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in tags
    assert "Traceback" not in proc.stderr and "INFO" not in proc.stdout
    runs = mlflow_api(base, "runs/search", {"experiment_ids": [exp], "max_results": 100})["runs"]
    assert sorted(run["info"]["run_name"] for run in runs) == ["tiny-digits", "trial-0", "trial-1"]


def _browser(url: str, folder: Path) -> str:
    profile = folder / f"profile-{time.monotonic_ns()}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S).stdout


def test_mlflow_ui_shows_the_study_in_chromium(searched):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Chromium (.ci/run installs Debian's chromium)")
        pytest.skip("Chromium is not installed here (apt-get install chromium)")
    proc, base, exp, folder = searched
    runs = mlflow_api(base, "runs/search", {"experiment_ids": [exp], "max_results": 100})["runs"]
    by_name = {run["info"]["run_name"]: run for run in runs}
    # The page the search prints opens on the training runs, not on MLflow 3's GenAI overview of traces.
    printed = re.search(r"then open http://127\.0\.0\.1:5000/(\S+)", proc.stdout)[1]
    runs_page = _browser(f"{base}/{printed}", folder)
    text = re.sub(r"(<[^>]+>)+", "|", runs_page)
    assert "|Overview|" not in text  # the GenAI side bar (Overview, Observability, Traces, Judges) is not shown
    # A row of the runs table links the study's parent run (its trials are nested under it).
    parent_id = by_name["tiny-digits"]["info"]["run_id"]
    assert re.search(rf'href="#/experiments/{exp}/runs/{parent_id}"><span[^>]*>tiny-digits</span>', runs_page)
    trial = by_name["trial-1"]
    run_page = _browser(f"{base}/#/experiments/{exp}/runs/{trial['info']['run_id']}", folder)
    text = re.sub(r"(<[^>]+>)+", "|", run_page)  # cells as |key|value|
    params = {p["key"]: p["value"] for p in trial["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in trial["data"]["metrics"]}
    # The parameters and metrics tables show the trial's own values.
    assert f"|arch|{params['arch']}|" in text
    for key in ("val_acc", "latency_ms", "params"):
        assert re.search(rf"\|{key}\|{re.escape(repr(metrics[key]).removesuffix('.0'))}\|", text), key


def test_report_cli_redraws_the_latest_studys_plots(searched):
    """``python -m nas.report`` (the search ran with search.plots=false): charts written and logged."""
    _, base, exp, folder = searched
    parent = mlflow_api(base, "runs/search", {"experiment_ids": [exp], "filter": "attributes.run_name = 'tiny-digits'"})
    parent_id = parent["runs"][0]["info"]["run_id"]
    listed = lambda: mlflow_api(base, f"artifacts/list?run_id={parent_id}&path=plots").get("files", [])  # noqa: E731
    assert listed() == []
    report = [sys.executable, "-m", "nas.report"]
    proc = subprocess.run(report, capture_output=True, text=True, cwd=folder, env=subprocess_env(), timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    note, *lines = proc.stdout.splitlines()  # two networks: too few for the importance chart, which says so
    assert note.startswith("  what-matters chart not drawn: 2 trained network(s) sampled by the search, fewer than")
    where = r"\(latency in torch on .+\)"
    assert re.fullmatch(rf"(\d+) files in outputs/reports/tiny-digits/ {where} and the study's MLflow run", lines[0])
    files = [Path(line.strip()) for line in lines[1:]]
    assert len(files) == int(lines[0].split()[0]) and "accuracy_vs_latency.html" in {f.name for f in files}
    assert all((folder / f if not f.is_absolute() else f).stat().st_size > 0 for f in files)
    assert {Path(f["path"]).name for f in listed()} == {f.name for f in files}
