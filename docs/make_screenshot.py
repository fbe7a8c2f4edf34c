"""Regenerate docs/mlflow-ui.png: a study's runs in the MLflow UI, as a user compares them.

    python docs/make_screenshot.py FOLDER STUDY [docs/mlflow-ui.png]

FOLDER holds the ``outputs/mlflow.db`` of a finished search (e.g. the README's quick start). Serves
it with ``mlflow ui``, opens the experiment in headless Chromium through Playwright, shows the
columns a comparison needs (``val_acc``, ``latency_ms``, ``params``, ``arch``), expands the study
run's trials, sorts them by ``val_acc`` and takes the screenshot. A maintainer's tool, not part of
the product: it needs ``pip install playwright`` and Debian's ``chromium`` (no browser download).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

COLUMNS = ["metrics.`val_acc`", "metrics.`latency_ms`", "metrics.`params`", "params.`arch`", "tags.`nas.state`"]


def _serve(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///outputs/mlflow.db",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(90):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2).read()
            return server, base
        except OSError:
            time.sleep(1)
    server.terminate()
    raise RuntimeError("mlflow ui did not start")


def _api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def main(folder: Path, study: str, out: Path) -> None:
    server, base = _serve(folder)
    try:
        exp = _api(base, f"experiments/get-by-name?experiment_name={study}")["experiment"]["experiment_id"]
        runs = _api(base, "runs/search", {"experiment_ids": [exp], "max_results": 1000})["runs"]
        parent = next(r["info"]["run_id"] for r in runs if r["info"]["run_name"] == study)
        query = urllib.parse.urlencode({"orderByKey": "metrics.`val_acc`", "orderByAsc": "false"})
        url = f"{base}/#/experiments/{exp}/runs?{query}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 820})
            page.goto(url)
            page.wait_for_timeout(5000)
            # The experiment page keeps its view (columns, expanded runs) in localStorage: set it, then reload.
            keys = [k for k in page.evaluate("Object.keys(localStorage)") if "ExperimentPage" in k]
            key = keys[0] if keys else f'MLflowLocalStorage-1.1-ExperimentPage-["{exp}"]-ReactComponentState'
            state = json.loads(page.evaluate("k => localStorage.getItem(k) || '{}'", key))
            state.update(selectedColumns=COLUMNS, runsExpanded={parent: True})
            page.evaluate("([k, v]) => localStorage.setItem(k, v)", [key, json.dumps(state)])
            page.goto(url)
            page.reload()
            page.wait_for_timeout(6000)
            assistant = page.get_by_text("MLflow Assistant")  # a side panel that would hide half the table
            if assistant.count():
                buttons = assistant.locator("xpath=ancestor::div[.//button][1]").locator("button")
                buttons.last.click()
                page.wait_for_timeout(1000)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), sys.argv[2], Path(sys.argv[3] if len(sys.argv) > 3 else "docs/mlflow-ui.png"))
