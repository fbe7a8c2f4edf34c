"""Connecting to MLflow and the runs that are not trials (latency reports)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from nas.errors import NasError
from nas.urls import mask_url


def _check_reachable(uri: str) -> None:
    parts = urlsplit(uri)  # urllib takes no user:password@ in a URL; /health needs none
    health = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/") + "/health"
    try:
        urllib.request.urlopen(health, timeout=5).read()
    except (urllib.error.URLError, OSError) as exc:
        raise NasError(
            f"MLflow tracking server {mask_url(uri)} is unreachable ({getattr(exc, 'reason', exc)}); start it "
            f"(mlflow server --host 127.0.0.1 --port 5000) or use the embedded default "
            f"mlflow.tracking_uri=sqlite:///outputs/mlflow.db"
        ) from None


def set_tracking_uri(uri: str) -> None:
    """MLflow's fluent API pointed at ``uri``, leaving ``MLFLOW_TRACKING_URI`` as the user set it: MLflow's
    setter also writes the variable, which ``mlflow.tracking_uri`` defaults to, so the next configuration
    composed in this process (a test, a notebook) would silently record in this store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def connect(cfg: DictConfig) -> MlflowClient:
    """Point MLflow at ``cfg.tracking_uri``: make an embedded store's folder, fail fast when a server is down."""
    uri = str(cfg.tracking_uri)
    if uri.startswith("sqlite:///"):
        # Absolute: MLflow caches one store per URI, and a relative path would follow the working directory.
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    elif uri.startswith(("http://", "https://")):
        _check_reachable(uri)
        # MLflow prints a "View run ... at: <server URL>" link for every run it ends: hundreds of lines in a
        # search, and the server's password with them when the URL carries one.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    if uri.startswith(("http://", "https://")):
        _check_allowed(client, uri)
    return client


def _check_allowed(client: MlflowClient, uri: str) -> None:
    """A server with authentication refuses anonymous calls: say which credentials it wants, up front."""
    try:
        client.search_experiments(max_results=1)
    except MlflowException as exc:
        reason = str(exc).splitlines()[0][:200]
        refused = "401" in reason or "403" in reason or exc.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        fix = (
            "give its user name and password in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            if refused
            else "check the server's log"
        )
        raise NasError(f"MLflow tracking server {mask_url(uri)} refused the request ({reason}); {fix}") from None


# MLflow 3's UI opens an experiment on its GenAI pages (Overview, Traces) unless told it trains models: the
# experiment's kind tag, and the workflowType its URL carries (the UI's sidebar switch, which wins where shown).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
UI_RUNS_PAGE = "#/experiments/{id}/runs?workflowType=machine_learning"


def runs_page(ui_base: str, experiment: str) -> str:
    """The experiment's table of runs in MLflow's UI at ``ui_base`` (http://127.0.0.1:5000 for ``mlflow ui``)."""
    return f"{ui_base.rstrip('/')}/{UI_RUNS_PAGE.format(id=experiment)}"


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Get or create an experiment (tagged as one that trains models); tolerates another worker creating it at
    the same moment."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(KIND_TAG) is None:  # made by an older version, or by hand
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
    location = None
    if artifact_location:
        location = Path(artifact_location).resolve().as_uri() if "://" not in artifact_location else artifact_location
    try:
        return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_latency_report(cfg: DictConfig, report: Any) -> str:
    """The fidelity report as a run of the ``latency-fidelity`` experiment; returns the run id."""
    client = connect(cfg.mlflow)
    exp = experiment_id(client, "latency-fidelity", cfg.mlflow.artifact_location)
    data = report.as_dict()
    with mlflow.start_run(experiment_id=exp, run_name=f"{report.space}-{report.settings['device']}") as run:
        mlflow.log_params({f"latency.{k}": v for k, v in report.settings.items()})
        mlflow.log_params({"space": report.space, "n": report.n})
        mlflow.log_metrics({k: float(v) for k, v in data.items() if isinstance(v, int | float) and k != "n"})
        mlflow.log_dict(data, "latency_fidelity.json")
    return run.info.run_id
