"""No password in any output, file or MLflow field: a password-protected MLflow server, through the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import AUTH_PASSWORD, FAST, HANG_S, TINY_SPACE, mlflow_server, subprocess_env

TABLE = ("latency.estimator=table", "latency.calibrate=2")


def _search(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    space = cwd / "tiny.yaml"
    space.write_text(TINY_SPACE)
    cmd = [sys.executable, "-m", "nas.search", f"+space={space}", *FAST, *TABLE, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env or subprocess_env(), timeout=HANG_S)


def _files_with(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` holding ``secret``, except Hydra's record of the user's own command line."""
    users_own = [p for p in root.rglob("*") if p.parent.name == ".hydra" and "runs" in p.parts]
    files = [p for p in root.rglob("*") if p.is_file() and p not in users_own]
    return [str(p.relative_to(root)) for p in files if secret.encode() in p.read_bytes()]


def _mlflow_fields(base: str, env_auth: dict) -> str:
    """Every param and tag of every run the server holds, as one text."""
    os.environ.update(env_auth)
    try:
        client = MlflowClient(base)
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        return "\n".join(f"{k}={v}" for r in runs for k, v in {**r.data.params, **r.data.tags}.items())
    finally:
        for key in env_auth:
            os.environ.pop(key)


def test_credentials_from_the_url_or_the_environment_are_never_shown_or_stored(tmp_path):
    """One authenticating server for both ways of giving the password: refused without it, then a URL holding
    it, with two workers (the URL travels to them), then the environment's MLFLOW_TRACKING_USERNAME/PASSWORD
    (nothing on the command line): the password is in no output, file or MLflow field."""
    with mlflow_server(tmp_path, auth=True) as (_, base):
        refused = _search(tmp_path, "trials=1", f"mlflow.tracking_uri={base}")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"MLflow tracking server {base} refused the request" in refused.stderr
        assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in refused.stderr

        url = base.replace("http://", f"http://admin:{AUTH_PASSWORD}@")
        done = _search(tmp_path, "trials=2", "search.workers=2", f"mlflow.tracking_uri={url}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert AUTH_PASSWORD not in done.stdout + done.stderr
        assert f"mlflow.tracking_uri={base.replace('http://', 'http://admin:***@')}" in done.stdout  # retrain hint
        assert (tmp_path / "outputs" / "workers" / "tiny-digits" / "worker.yaml").is_file()
        assert _files_with(tmp_path / "outputs", AUTH_PASSWORD) == []
        auth = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": AUTH_PASSWORD}
        fields = _mlflow_fields(base, auth)
        assert "arch=nas1-" in fields and "admin:***@" in fields  # the runs are there, the URL masked
        assert AUTH_PASSWORD not in fields

        env = subprocess_env() | auth
        done = _search(tmp_path, "trials=3", f"mlflow.tracking_uri={base}", env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "[3/3] trial" in done.stdout
        assert _files_with(tmp_path / "outputs", AUTH_PASSWORD) == []  # not even Hydra's record of the command
