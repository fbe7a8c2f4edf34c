"""The one interface the search uses to know a candidate's latency before training it."""

from __future__ import annotations

from typing import Protocol

import torch
from omegaconf import DictConfig

from nas.errors import NasError
from nas.latency.measure import LatencySettings, measure_arch
from nas.latency.runtime import Runtime, make_runtime
from nas.latency.table import LatencyTable, LayerModel, build_table
from nas.space import Arch, Space

ESTIMATORS = ("measure", "table")


class LatencyEstimator(Protocol):
    settings: LatencySettings

    def latency_ms(self, arch: Arch) -> float: ...


def settings_from_cfg(cfg: DictConfig, runtime: Runtime | None = None) -> LatencySettings:
    """``cfg`` is the ``latency`` node; ``runtime`` one already made from it (it loads a library)."""
    runtime = runtime or make_runtime(cfg.get("runtime"))
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

    def latency_ms(self, arch: Arch) -> float:
        return measure_arch(arch, self.num_classes, self.settings).median_ms


class TableLatency:
    """Looks the network up in the per-layer table: microseconds, and safe beside training processes."""

    def __init__(self, model: LayerModel, settings: LatencySettings, num_classes: int) -> None:
        self.model = model
        self.settings = settings
        self.num_classes = num_classes

    def latency_ms(self, arch: Arch) -> float:
        return self.model.predict(arch, self.num_classes)


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
    return build_table(space, LatencyTable(settings, cfg.table_dir), num_classes, calibrate, seed).model


def make_estimator(
    cfg: DictConfig, num_classes: int, space: Space, seed: int = 0, stored: dict | None = None
) -> LatencyEstimator:
    """``cfg`` is the ``latency`` node; ``stored`` a study's :meth:`LayerModel.record`, if it has one."""
    settings = settings_from_cfg(cfg)
    if cfg.estimator == "measure":
        return MeasuredLatency(settings, num_classes)
    if cfg.estimator == "table":
        return TableLatency(table_model(cfg, settings, space, num_classes, seed, stored), settings, num_classes)
    raise NasError(f"latency.estimator={cfg.estimator!r} is not one of {', '.join(ESTIMATORS)}")
