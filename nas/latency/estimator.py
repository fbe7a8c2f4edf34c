"""The one interface the search uses to know a candidate's latency before training it."""

from __future__ import annotations

from typing import Protocol

import torch
from omegaconf import DictConfig

from nas.errors import NasError
from nas.latency.measure import LatencySettings, LatencyStats, measure_module
from nas.latency.table import LatencyTable
from nas.models import build
from nas.space import Arch

ESTIMATORS = ("measure", "table")


class LatencyEstimator(Protocol):
    settings: LatencySettings

    def latency_ms(self, arch: Arch) -> float: ...


def settings_from_cfg(cfg: DictConfig) -> LatencySettings:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return LatencySettings(
        device=device,
        batch_size=int(cfg.batch_size),
        mode=cfg.mode,
        threads=int(cfg.threads),
        warmup=int(cfg.warmup),
        repeats=int(cfg.repeats),
        max_cv=float(cfg.get("max_cv", 0.15)),
    )


def measure_arch(arch: Arch, num_classes: int, settings: LatencySettings) -> LatencyStats:
    model = build(arch, num_classes)
    return measure_module(model, (settings.batch_size, 3, arch.resolution, arch.resolution), settings)


class MeasuredLatency:
    """Builds and times the whole network on the target: exact, but costs a measurement per trial."""

    def __init__(self, settings: LatencySettings, num_classes: int) -> None:
        self.settings = settings
        self.num_classes = num_classes

    def latency_ms(self, arch: Arch) -> float:
        return measure_arch(arch, self.num_classes, self.settings).median_ms


class TableLatency:
    """Looks the network up in the per-layer table: microseconds, and safe beside training processes."""

    def __init__(self, table: LatencyTable, num_classes: int) -> None:
        self.table = table
        self.settings = table.settings
        self.num_classes = num_classes

    def latency_ms(self, arch: Arch) -> float:
        return self.table.predict(arch, self.num_classes)


def make_estimator(cfg: DictConfig, num_classes: int) -> LatencyEstimator:
    settings = settings_from_cfg(cfg)
    if cfg.estimator == "measure":
        return MeasuredLatency(settings, num_classes)
    if cfg.estimator == "table":
        return TableLatency(LatencyTable(settings, cfg.table_dir), num_classes)
    raise NasError(f"latency.estimator={cfg.estimator!r} is not one of {', '.join(ESTIMATORS)}")
