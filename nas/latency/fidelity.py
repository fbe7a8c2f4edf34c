"""How well the lookup table predicts measured latency: rank correlation, error, and cost."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from nas.latency.measure import measure_arch
from nas.latency.table import Calibration, LatencyTable
from nas.space import Space


@dataclass
class FidelityReport:
    space: str
    n: int
    device_name: str
    settings: dict
    spearman: float
    mape_pct: float
    mape_uncalibrated_pct: float
    calibration_a: float
    calibration_b: float
    calibration_networks: int
    measured_min_ms: float
    measured_max_ms: float
    repeat_cv_pct: float  # spread of the same network measured 3 times
    predict_s: float
    measure_s: float
    table_entries: int
    # Per network: its string, measured median, calibrated prediction and raw layer sum (ms), so an
    # outlier can be looked at and the summary figures recomputed.
    networks: list[dict] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.measure_s / max(self.predict_s, 1e-12)

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}

    def lines(self) -> list[str]:
        return [
            f"latency fidelity on {self.device_name} ({self.settings}), space {self.space}, {self.n} networks",
            f"  measured latency: {self.measured_min_ms:.3f} .. {self.measured_max_ms:.3f} ms",
            f"  Spearman rank correlation: {self.spearman:.4f}",
            f"  mean absolute percentage error: {self.mape_pct:.2f}% calibrated "
            f"(a={self.calibration_a:.4f}, b={self.calibration_b:.4f} ms, fitted on {self.calibration_networks} "
            f"other networks); {self.mape_uncalibrated_pct:.2f}% raw sum",
            f"  repeat measurements of one network: CV {self.repeat_cv_pct:.2f}%",
            f"  cost: one prediction {self.predict_s * 1e6:.1f} us, one measurement {self.measure_s * 1e3:.1f} ms "
            f"({self.speedup:,.0f}x cheaper)",
        ]


def report_path(table_dir: str | Path, space_name: str, table: LatencyTable) -> Path:
    """Where ``python -m nas.latency validate`` writes its report for this space and table."""
    return Path(table_dir) / f"validate-{space_name}-{table.path.stem.removeprefix('table-')}.json"


def error_band(report: dict) -> float:
    """The 90th percentile of the table's relative error in a validate report: the band of budgets within
    which a prediction may be on the wrong side."""
    errors = [abs(n["predicted_ms"] - n["measured_ms"]) / n["measured_ms"] for n in report["networks"]]
    return float(np.quantile(errors, 0.9))


def validate(
    space: Space, table: LatencyTable, calibration: Calibration | None, num_classes: int, n: int, seed: int
) -> FidelityReport:
    """``n`` networks of the space (other than the calibration's) predicted with the space's calibration and
    measured whole."""
    rng = np.random.default_rng(seed)
    archs = [space.sample(rng) for _ in range(n)]
    for a in archs:  # fill any gaps first, so prediction timing measures lookups only
        table.raw_sum(a, num_classes)
    t0 = time.perf_counter()
    predicted = [table.predict(a, num_classes, calibration) for a in archs]
    predict_s = (time.perf_counter() - t0) / n
    raw = [table.raw_sum(a, num_classes) for a in archs]
    t0 = time.perf_counter()
    measured = [measure_arch(a, num_classes, table.settings).median_ms for a in archs]
    measure_s = (time.perf_counter() - t0) / n
    repeats = [measure_arch(archs[0], num_classes, table.settings).median_ms for _ in range(3)]
    m, p, r = np.asarray(measured), np.asarray(predicted), np.asarray(raw)
    a, b = (calibration.a, calibration.b) if calibration else (1.0, 0.0)
    return FidelityReport(
        space=space.name,
        n=n,
        device_name=table.settings.device_name(),
        settings=table.settings.key_fields(),
        spearman=float(spearmanr(m, p).statistic),
        mape_pct=float(np.mean(np.abs(p - m) / m) * 100),
        mape_uncalibrated_pct=float(np.mean(np.abs(r - m) / m) * 100),
        calibration_a=a,
        calibration_b=b,
        calibration_networks=calibration.networks if calibration else 0,
        measured_min_ms=float(m.min()),
        measured_max_ms=float(m.max()),
        repeat_cv_pct=statistics.pstdev(repeats) / statistics.fmean(repeats) * 100,
        predict_s=predict_s,
        measure_s=measure_s,
        table_entries=len(table.entries),
        networks=[
            {"arch": arch.encode(), "measured_ms": mi, "predicted_ms": pi, "raw_ms": ri}
            for arch, mi, pi, ri in zip(archs, measured, predicted, raw, strict=True)
        ],
    )
