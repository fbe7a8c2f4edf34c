"""What the finalist round may conclude from a few seeds: intervals, paired verdicts with a stated error rate,
and how well the short search runs ranked the networks, each with its uncertainty.

Why a module of its own: these are the figures a user quotes ("the search beat MobileNetV3", "the proxy ranks
well"), and each must come with the chance that it is noise. Accuracy over seeds is taken as roughly normal
(Student's t over the paired differences); the verdicts of one table are corrected together (Holm), so with
three finalists equal to a reference the chance that *any* of them "beats" it stays within ``alpha``.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95  # of the intervals shown; the verdicts use search.verdict_alpha
MIN_FIDELITY_NETWORKS = 5  # below this a rank correlation's interval spans nearly [-1, 1]: no figure is shown
BOOTSTRAP_RESAMPLES = 2000
ONE_SEED = "one seed: no verdict"


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def text(self, signed: bool = False) -> str:
        return f"[{self.low:+.4f}, {self.high:+.4f}]" if signed else f"[{self.low:.4f}, {self.high:.4f}]"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """Student's t interval of the mean; None with one value (no spread known)."""
    if len(values) < 2:
        return None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return Interval(mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    """A network against a reference over the seeds both finished (seed s of each shares its data order)."""

    reference: str
    seeds: int
    diff: float  # mean of the paired differences (network - reference)
    interval: Interval | None  # CONFIDENCE interval of that mean
    p_value: float | None  # two-sided paired t-test; None with fewer than 2 seeds
    verdict: str = ONE_SEED

    def text(self) -> str:
        """The verdict and its evidence; the interval is this comparison's own, the verdict is corrected for the
        others in its table, so an interval that misses 0 beside ``ties`` is not a contradiction."""
        spread = f" {self.interval.text(signed=True)}" if self.interval else ""
        p = f", p {self.p_value:.3f}" if self.p_value is not None else ""
        return f"{self.verdict} {self.reference} ({self.diff:+.4f}{spread}{p})"


def paired_comparison(network: Mapping[int, float], reference: Mapping[int, float], name: str) -> Comparison:
    """The paired differences' mean, interval and p-value; the verdict is left to :func:`decide`.

    Differences that are all the same give no p-value either: accuracies on a validation split are
    multiples of 1/N, so two seeds can differ by exactly the same step by chance, and a t statistic over zero
    spread would call that certain."""
    seeds = sorted(set(network) & set(reference))
    diffs = [network[s] - reference[s] for s in seeds]
    diff = statistics.fmean(diffs) if diffs else math.nan
    if len(diffs) < 2:
        return Comparison(name, len(diffs), diff, None, None)
    interval = mean_interval(diffs)
    if max(diffs) - min(diffs) <= 1e-12:
        return Comparison(name, len(diffs), diff, interval, 1.0)
    result = stats.ttest_rel([network[s] for s in seeds], [reference[s] for s in seeds])
    return Comparison(name, len(diffs), diff, interval, float(result.pvalue))


def holm_rejections(p_values: Sequence[float | None], alpha: float) -> list[bool]:
    """Holm's step-down correction: which hypotheses are rejected with a family-wise error rate of ``alpha``."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    rejected = [False] * len(p_values)
    for rank, (p, i) in enumerate(tested):
        if p > alpha / (len(tested) - rank):
            break
        rejected[i] = True
    return rejected


def decide(comparisons: Sequence[Comparison], alpha: float) -> list[Comparison]:
    """Verdicts for one family (every network of the round against one reference): ``beats`` / ``loses`` where
    Holm rejects equality at ``alpha``, else ``ties``; one paired seed: no verdict."""
    rejected = holm_rejections([c.p_value for c in comparisons], alpha)
    out = []
    for c, reject in zip(comparisons, rejected, strict=True):
        verdict = ("beats" if c.diff > 0 else "loses") if reject else "ties"
        verdict = ONE_SEED if c.p_value is None else verdict
        out.append(Comparison(c.reference, c.seeds, c.diff, c.interval, c.p_value, verdict))
    return out


@dataclass(frozen=True)
class Fidelity:
    """Rank agreement between the search's short runs and the round's longer ones over the round's networks."""

    networks: int
    kendall_tau: float | None = None
    kendall_interval: Interval | None = None
    spearman: float | None = None
    spearman_interval: Interval | None = None

    @property
    def estimated(self) -> bool:
        return self.kendall_tau is not None

    def line(self) -> str:
        if self.networks < MIN_FIDELITY_NETWORKS:
            return (
                f"proxy fidelity: too few networks to estimate fidelity ({self.networks}; at least "
                f"{MIN_FIDELITY_NETWORKS}: raise search.fidelity_sample)"
            )
        if not self.estimated:
            return f"proxy fidelity: undefined over {self.networks} networks (their search accuracies all tie)"
        return (
            f"proxy fidelity over {self.networks} networks: Kendall tau {_signed(self.kendall_tau)} "
            f"{_span(self.kendall_interval)}, Spearman {_signed(self.spearman)} {_span(self.spearman_interval)} "
            f"({CONFIDENCE:.0%} bootstrap intervals; +1: the search's short runs rank networks as the round does)"
        )

    def record(self) -> dict[str, Any]:
        return asdict(self)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _span(interval: Interval | None) -> str:
    return "[-]" if interval is None else f"[{interval.low:+.2f}, {interval.high:+.2f}]"


def _defined(value: float) -> float:
    """A resample whose search accuracies are all one value has no rank order: counted as no agreement (0)."""
    return float(value) if math.isfinite(value) else 0.0


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return _defined(stats.kendalltau(x, y).statistic)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return _defined(stats.spearmanr(x, y).statistic)


def rank_fidelity(search_accs: Sequence[float], round_accs: Sequence[float], seed: int) -> Fidelity:
    """Kendall's tau and Spearman's rho with percentile-bootstrap intervals (networks resampled in pairs);
    nothing below :data:`MIN_FIDELITY_NETWORKS`, where an interval would span nearly everything."""
    n = len(search_accs)
    if n < MIN_FIDELITY_NETWORKS:
        return Fidelity(n)
    x, y = np.asarray(search_accs, dtype=float), np.asarray(round_accs, dtype=float)
    tau, rho = stats.kendalltau(x, y).statistic, stats.spearmanr(x, y).statistic
    if not (math.isfinite(tau) and math.isfinite(rho)):
        return Fidelity(n)
    intervals = []
    for statistic in (_kendall, _spearman):
        result = stats.bootstrap(
            (x, y), statistic, paired=True, vectorized=False, method="percentile",
            n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=CONFIDENCE, rng=np.random.default_rng(seed),
        )  # fmt: skip
        ci = result.confidence_interval
        intervals.append(Interval(float(ci.low), float(ci.high)))
    return Fidelity(n, float(tau), intervals[0], float(rho), intervals[1])
