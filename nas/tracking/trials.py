"""MLflow runs of a study: one parent run, one nested run per trial, per-epoch metrics from Lightning.

MLflow's client and Optuna's storage are the sources of truth; the parent
run's id is kept in the study's user attributes so resumed runs and extra
workers log under the same parent.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig, OmegaConf

from nas.errors import NasError
from nas.tracking.runs import experiment_id
from nas.urls import mask_url

TRAIN_METRICS = ("train_loss", "train_acc")
VAL_METRICS = ("val_loss", "val_acc")
PARENT_ATTR = "mlflow_parent_run_id"
MAX_PARAM = 6000  # MLflow's limit on a param value


F = TypeVar("F", bound=Callable[..., Any])


class TrackingError(NasError):
    """MLflow could not be reached, or refused a call (a tracking server down mid-search)."""


def tracked(method: F) -> F:
    """One clear error, naming the server (password masked), instead of MLflow's or requests' exceptions."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (MlflowException, OSError) as exc:
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise TrackingError(f"MLflow tracking at {mask_url(self.client.tracking_uri)} failed: {reason}") from None

    return wrapper  # type: ignore[return-value]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _params(values: Mapping[str, Any]) -> list[Param]:
    return [Param(str(k), str(v)[:MAX_PARAM]) for k, v in values.items()]


def flatten_config(cfg: DictConfig, hide: tuple[str, ...] = ("study.storage",)) -> dict[str, Any]:
    """Dotted keys of the resolved config; secrets (the storage URL) are left to the caller to mask."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif prefix not in hide:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


class EpochMetricsToMlflow(pl.Callback):
    """Logs train/val loss and accuracy once per epoch (step = epoch) to the trial's run.

    Validation metrics when validation ends (a pruned trial stops right there, and its last epoch
    must not be lost); training metrics at the end of the training epoch, the first moment
    Lightning holds their epoch values (during validation it still shows the previous epoch's). Logged
    synchronously: MLflow's asynchronous queue costs up to a second when the run ends (its thread polls the
    queue once a second), more than a short trial's epochs take to log (measured: 4.5 s of an 18 s search of 4
    tiny trials).
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.error: str | None = None  # the first failure: per-epoch metrics are not worth failing a trial for

    def _log(self, trainer: pl.Trainer, keys: tuple[str, ...]) -> None:
        if trainer.sanity_checking or self.error is not None:
            return
        now, epoch = _now_ms(), trainer.current_epoch
        metrics = [
            Metric(k, float(trainer.callback_metrics[k]), now, epoch) for k in keys if k in trainer.callback_metrics
        ]
        if metrics:
            try:
                self.client.log_batch(self.run_id, metrics=metrics)
            except (MlflowException, OSError) as exc:
                self.error = str(exc).splitlines()[0][:300]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, VAL_METRICS)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, TRAIN_METRICS)


class StudyTracker:
    """The MLflow side of one study."""

    def __init__(self, client: MlflowClient, cfg: DictConfig, study_name: str) -> None:
        self.client = client
        self.cfg = cfg
        self.study_name = study_name
        self.experiment_id = experiment_id(
            client, cfg.mlflow.experiment or study_name, cfg.mlflow.get("artifact_location")
        )
        self.parent_run_id: str | None = None

    # -- the study's parent run -------------------------------------------------------------
    @tracked
    def open_parent(self, study: Any, params: Mapping[str, Any], space_file: Path | None) -> str:
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.study_name,
                tags={"nas.study": self.study_name, "nas.kind": "study"},
            )
            run_id = run.info.run_id
            study.set_user_attr(PARENT_ATTR, run_id)
            self.client.log_batch(run_id, params=_params(params))
            if space_file is not None:
                self.client.log_artifact(run_id, str(space_file), "space")
        self.parent_run_id = run_id
        return run_id

    def join_parent(self, study: Any) -> str | None:
        """Workers log under the parent that the main process created."""
        self.parent_run_id = study.user_attrs.get(PARENT_ATTR)
        return self.parent_run_id

    @tracked
    def close_parent(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    @tracked
    def log_parent_dict(self, data: Any, artifact_file: str) -> None:
        if self.parent_run_id:
            self.client.log_dict(self.parent_run_id, data, artifact_file)

    @tracked
    def log_parent_text(self, text: str, artifact_file: str) -> None:
        if self.parent_run_id:
            self.client.log_text(self.parent_run_id, text, artifact_file)

    @tracked
    def log_parent_file(self, path: Path, artifact_path: str | None = None) -> None:
        if self.parent_run_id:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path)

    @tracked
    def log_parent_table(self, table: Mapping[str, list], artifact_file: str) -> None:
        """MLflow's table layout (``columns`` + ``data`` rows, shown as a table in its UI), written whole: its
        ``log_table`` appends to an existing file, and a resumed study's end would repeat every row."""
        if self.parent_run_id:
            rows = [list(row) for row in zip(*table.values(), strict=True)]
            self.client.log_dict(self.parent_run_id, {"columns": list(table), "data": rows}, artifact_file)

    # -- one trial ------------------------------------------------------------------------------
    def _start(self, name: str, parent: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        all_tags = {"nas.study": self.study_name, **tags}
        if parent:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    @tracked
    def start_trial(self, number: int, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        tags = {"nas.kind": "trial", "nas.stage": "search", "optuna.trial_number": str(number),
                "nas.state": "running", **tags}  # fmt: skip
        return self._start(f"trial-{number}", self.parent_run_id, params, tags)

    # -- the finalist round: a run per finalist under the study's run, a run per seed under that --------
    @tracked
    def start_finalist(self, number: int, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        tags = {"nas.kind": "finalist", "nas.stage": "finalist", "optuna.trial_number": str(number), **tags}
        return self._start(f"finalist-{number}", self.parent_run_id, params, tags)

    @tracked
    def start_finalist_seed(self, finalist_run_id: str, number: int, seed: int, params: Mapping[str, Any]) -> str:
        tags = {"nas.kind": "finalist_seed", "nas.stage": "finalist", "optuna.trial_number": str(number),
                "nas.seed": str(seed), "nas.state": "running"}  # fmt: skip
        return self._start(f"finalist-{number}-seed-{seed}", finalist_run_id, params, tags)

    @tracked
    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    @tracked
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @tracked
    def close_orphan_seed_runs(self) -> int:
        """End finalist seed runs left RUNNING by a killed worker: called once no finalist trains."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`nas.study` = '{self.study_name}' and tags.`nas.kind` = 'finalist_seed' "
            "and attributes.status = 'RUNNING'",
        )
        for run in runs:
            self.end_trial(run.info.run_id, "killed", "KILLED", "the process training this seed was killed")
        return len(runs)

    @tracked
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = _now_ms()
        clean = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if clean:
            self.client.log_batch(run_id, metrics=clean)

    @tracked
    def end_trial(self, run_id: str, state: str, status: str, reason: str | None = None) -> None:
        tags = [RunTag("nas.state", state)]
        if reason:
            tags.append(RunTag("nas.fail_reason", reason[:5000]))
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, status=status)

    @tracked
    def close_stale_runs(self, running_trial_numbers: set[int]) -> int:
        """End trial runs left RUNNING by a killed process (their Optuna trial is no longer running)."""
        closed = 0
        for run in self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`nas.study` = '{self.study_name}' and attributes.status = 'RUNNING'",
        ):
            if run.data.tags.get("nas.kind") != "trial":
                continue
            if int(run.data.tags.get("optuna.trial_number", -1)) in running_trial_numbers:
                continue
            self.end_trial(run.info.run_id, "killed", "KILLED", "the process running this trial was killed")
            closed += 1
        return closed
