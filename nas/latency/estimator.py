"""The one interface the search uses to know a candidate's latency before training it."""

from __future__ import annotations

import json
from typing import Protocol

import torch
from omegaconf import DictConfig

from nas.errors import NasError
from nas.latency.fidelity import error_band, report_path
from nas.latency.measure import LatencySettings, LatencyStats, measure_arch
from nas.latency.runtime import Runtime, make_runtime
from nas.latency.table import LatencyTable, LayerModel, build_table
from nas.space import Arch, Space

ESTIMATORS = ("measure", "table")
# What a trial records when its prediction was close enough to the budget to be measured (latency.verify_band).
PREDICTED_ATTR, MEASURED_ATTR, CHANGED_ATTR = "latency_predicted_ms", "latency_measured_ms", "budget_decision_changed"
# What a measured figure was timed in (cudagraph, eager, a runtime's name), and why not the configured mode.
MODE_ATTR, MODE_FALLBACK_ATTR = "latency_mode", "latency_mode_fallback"


class LatencyEstimator(Protocol):
    """``details`` says what the last figure was made of (prediction, measurement, the mode it was timed in),
    for the trial to record."""

    settings: LatencySettings
    details: dict[str, object]

    def latency_ms(self, arch: Arch) -> float: ...


def settings_from_cfg(cfg: DictConfig, runtime: Runtime | None = None) -> LatencySettings:
    """``cfg`` is the ``latency`` node; ``runtime`` one already made from it (it loads a library)."""
    runtime = runtime or make_runtime(cfg.get("runtime"), cfg.get("target"))
    device = cfg.device
    if device == "auto":  # the runtime's own kind of device where it has one
        device = runtime.device() or ("cuda" if torch.cuda.is_available() else "cpu")
    return LatencySettings(
        device=device,
        batch_size=int(cfg.batch_size),
        mode=cfg.mode,
        threads=int(cfg.threads),
        warmup=int(cfg.warmup),
        repeats=int(cfg.repeats),
        max_cv=float(cfg.get("max_cv", 0.15)),
        runtime=runtime,
    )


class MeasuredLatency:
    """Builds and times the whole network on the target: exact, but costs a measurement per trial."""

    def __init__(self, settings: LatencySettings, num_classes: int) -> None:
        self.settings = settings
        self.num_classes = num_classes
        self.details: dict[str, object] = {}

    def latency_ms(self, arch: Arch) -> float:
        stats = measure_arch(arch, self.num_classes, self.settings)
        self.details = mode_details(stats)
        return stats.median_ms


def mode_details(stats: LatencyStats) -> dict[str, object]:
    """The mode a measurement was timed in, and why it is not the configured one when capture failed."""
    return {MODE_ATTR: stats.mode, **({MODE_FALLBACK_ATTR: stats.fallback} if stats.fallback else {})}


class TableLatency:
    """Looks the network up in the per-layer table: microseconds, and safe beside training processes."""

    details: dict[str, object] = {}  # noqa: RUF012 -- read only: what the last figure was made of

    def __init__(self, model: LayerModel, settings: LatencySettings, num_classes: int) -> None:
        self.model = model
        self.settings = settings
        self.num_classes = num_classes

    def latency_ms(self, arch: Arch) -> float:
        return self.model.predict(arch, self.num_classes)


class VerifiedLatency:
    """The table's prediction, measured on the target when it lies within ``band`` (a fraction) of the
    budget: the draws whose verdict the table's error could flip are judged by a measurement, the rest by the
    table (budget decisions as good as measuring every draw, for a fraction of the measurements).
    ``details`` says what the last figure was made of, for the trial to record."""

    def __init__(self, table: TableLatency, budget_ms: float, band: float, source: str) -> None:
        self.table, self.budget_ms, self.band, self.source = table, budget_ms, band, source
        self.settings, self.model = table.settings, table.model
        self.measured = MeasuredLatency(table.settings, table.num_classes)
        self.details: dict[str, object] = {}

    def latency_ms(self, arch: Arch) -> float:
        predicted = self.table.latency_ms(arch)
        self.details = {PREDICTED_ATTR: predicted}
        if self.band <= 0 or abs(predicted - self.budget_ms) > self.band * self.budget_ms:
            return predicted
        measured = self.measured.latency_ms(arch)
        self.details |= {MEASURED_ATTR: measured, **self.measured.details}
        if (predicted <= self.budget_ms) != (measured <= self.budget_ms):
            self.details[CHANGED_ATTR] = True
        return measured

    def describe(self) -> str:
        if self.band <= 0:
            return f"latency.verify_band {self.source}"
        return (f"draws predicted within ±{self.band:.1%} of the budget are measured in "
                f"{self.settings.runtime.label()} before they are judged (band: {self.source})")  # fmt: skip


def verify_band(cfg: DictConfig, table: LatencyTable, space: Space) -> tuple[float, str]:
    """``latency.verify_band``: a fraction of the budget, 0 (off), or ``auto``: the band the last ``validate``
    of this table measured (its 90th-percentile error), off when it was never validated. With where it came
    from, for the start line."""
    value = cfg.get("verify_band", "auto")
    if value == "auto":
        path = report_path(cfg.table_dir, space.name, table)
        if not path.is_file():
            return 0.0, f"off: this table has no validate report ({path}; python -m nas.latency validate)"
        return error_band(json.loads(path.read_text())), f"the 90th-percentile error in {path}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise NasError(f"latency.verify_band={value!r} must be auto or a fraction of the budget in [0, 1)")
    return float(value), "latency.verify_band" if value else "off"


def latency_table(cfg: DictConfig, settings: LatencySettings) -> LatencyTable:
    """``latency.table=PATH`` (a table file that travels: built on the target and copied here), else this
    settings' file in ``latency.table_dir``."""
    if cfg.get("table"):
        return LatencyTable.at(cfg.table, settings)
    return LatencyTable(settings, cfg.table_dir)


def table_model(
    cfg: DictConfig, settings: LatencySettings, space: Space, num_classes: int, seed: int, stored: dict | None
) -> LayerModel:
    """A study's own layer latencies and calibration when it has them (measured with these settings), else the
    table file's, measured and calibrated for this space where they are missing."""
    if stored is not None and stored.get("settings") == settings.key_fields():
        return LayerModel.from_record(stored)
    calibrate = cfg.get("calibrate", 8)
    if isinstance(calibrate, bool) or not isinstance(calibrate, int) or calibrate < 0:
        raise NasError(f"latency.calibrate={calibrate!r} must be a whole number >= 0 (0: no calibration)")
    return build_table(space, latency_table(cfg, settings), num_classes, calibrate, seed).model


def make_estimator(
    cfg: DictConfig, num_classes: int, space: Space, seed: int = 0, stored: dict | None = None
) -> LatencyEstimator:
    """``cfg`` is the ``latency`` node; ``stored`` a study's :meth:`LayerModel.record`, if it has one."""
    settings = settings_from_cfg(cfg)
    if cfg.estimator == "measure":
        return MeasuredLatency(settings, num_classes)
    if cfg.estimator == "table":
        table = TableLatency(table_model(cfg, settings, space, num_classes, seed, stored), settings, num_classes)
        if cfg.get("budget_ms") is None:
            return table
        band, source = verify_band(cfg, latency_table(cfg, settings), space)
        return VerifiedLatency(table, float(cfg.budget_ms), band, source)
    raise NasError(f"latency.estimator={cfg.estimator!r} is not one of {', '.join(ESTIMATORS)}")
