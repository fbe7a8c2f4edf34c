"""Inference latency measured on the target device, in the configured runtime (:mod:`nas.latency.runtime`).

With PyTorch on CUDA the default is a CUDA-graph replay timed with CUDA events: eager batch-1 latency there is
mostly Python and launch overhead, which would rank networks by layer count rather than by what they cost
deployed. On CPU the thread count is fixed and the median of repeated runs is reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from nas.errors import NasError
from nas.latency.runtime import FileRuntime, Runtime, TorchRuntime, cuda_backend_fields
from nas.latency.sessions import cpu_name, spread, takes_until_steady
from nas.models import build
from nas.space import Arch

MODES = ("cudagraph", "eager")
ATTEMPTS = 3  # a measurement noisier than max_cv is taken again, up to this many times in all


@dataclass(frozen=True)
class LatencySettings:
    """Everything a latency figure depends on besides the network itself."""

    device: str = "cpu"
    batch_size: int = 1
    mode: str = "cudagraph"
    threads: int = 1
    warmup: int = 10
    repeats: int = 30
    max_cv: float = 0.15  # coefficient of variation above which a measurement is retried
    runtime: Runtime = field(default_factory=TorchRuntime, compare=False)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise NasError(f"latency.device={self.device!r} is not one of auto, cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise NasError("latency.device=cuda but no CUDA device is available; use latency.device=cpu")
        if self.mode not in MODES:
            raise NasError(f"latency.mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.batch_size < 1 or self.threads < 1 or self.repeats < 3 or self.warmup < 0:
            raise NasError("latency.batch_size and latency.threads must be >= 1, latency.repeats >= 3")
        if not self.max_cv > 0:
            raise NasError(f"latency.max_cv must be > 0 (a fraction such as 0.15), got {self.max_cv}")
        self.runtime.check(self.device)

    @property
    def is_torch(self) -> bool:
        return self.runtime.name == TorchRuntime.name

    @property
    def effective_mode(self) -> str:
        """CUDA graphs exist only in PyTorch on CUDA; on CPU every PyTorch measurement is eager; another runtime
        runs the network its own way (its name)."""
        if not self.is_torch:
            return self.runtime.name
        return self.mode if self.device == "cuda" else "eager"

    def device_name(self) -> str:
        remote = getattr(self.runtime, "device_name", lambda: None)()  # an agent's device, not this machine
        if remote:
            return remote
        if self.device == "cuda":
            return torch.cuda.get_device_name()
        return cpu_name()

    def key_fields(self) -> dict[str, object]:
        """What a cached figure is valid for: device, torch version, batch, mode, threads, and another runtime's
        identity (none for PyTorch's own, so that the tables and studies made before runtimes stay valid)."""
        fields: dict[str, object] = {
            "device": self.device,
            "device_name": self.device_name(),
            "torch": torch.__version__,
            "batch_size": self.batch_size,
            "mode": self.effective_mode,
        }
        if self.device == "cpu":
            fields["threads"] = self.threads
        else:
            fields.update(cuda_backend_fields())
        if not self.is_torch:
            fields["runtime"] = self.runtime.identity()
        return fields

    def as_dict(self) -> dict[str, object]:
        return {**asdict(replace(self, runtime=TorchRuntime())), "runtime": self.runtime.label()}


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float  # standard deviation / mean of the timed samples
    samples: int
    attempts: int = 1  # measurements taken (more than one when the first were noisier than max_cv)
    mode: str = ""  # what produced the figure: cudagraph, eager or the runtime's name
    fallback: str | None = None  # why mode is not the configured one (a network whose capture failed)


def _stats(samples_ms: list[float]) -> LatencyStats:
    ordered = sorted(samples_ms)
    n = len(ordered)
    return LatencyStats(
        median_ms=statistics.median(ordered),
        p10_ms=ordered[int(0.1 * (n - 1))],
        p90_ms=ordered[int(0.9 * (n - 1))],
        cv=spread(ordered),
        samples=n,
    )


def measure_module(model: nn.Module, input_shape: tuple[int, ...], settings: LatencySettings) -> LatencyStats:
    """Median latency of ``model`` in the settings' runtime on a random input of ``input_shape`` (batch
    dimension included); taken again (up to ATTEMPTS in all) while its spread exceeds ``max_cv``, keeping the
    steadiest attempt. A network the runtime cannot compile raises :class:`nas.latency.runtime.RuntimeRefused`."""
    take = settings.runtime.prepare(model, input_shape, settings)
    return _labelled(steadiest(take, settings.max_cv), take, settings)


def measure_file(path: Path, input_shape: tuple[int, ...], settings: LatencySettings) -> LatencyStats:
    """The exported ONNX file itself in the settings' runtime (one that executes ONNX files)."""
    runtime = settings.runtime
    if not hasattr(runtime, "prepare_file"):
        raise NasError(f"latency runtime {runtime.label()} does not execute ONNX files")
    file_runtime: FileRuntime = runtime  # type: ignore[assignment]
    take = file_runtime.prepare_file(path, input_shape, settings)
    return _labelled(steadiest(take, settings.max_cv), take, settings)


def _labelled(stats: LatencyStats, take: Callable[[], list[float]], settings: LatencySettings) -> LatencyStats:
    """The mode the sampler timed in: its own word where it has one (PyTorch falls back to eager when a network
    cannot be captured), else the settings'."""
    return replace(stats, mode=getattr(take, "mode", settings.effective_mode), fallback=getattr(take, "fallback", None))


def steadiest(take: Callable[[], list[float]], max_cv: float, attempts: int = ATTEMPTS) -> LatencyStats:
    """The first attempt within ``max_cv``, else the least noisy of ``attempts``."""
    takes = takes_until_steady(take, max_cv, attempts)
    return replace(min((_stats(t) for t in takes), key=lambda s: s.cv), attempts=len(takes))


def measure_arch(arch: Arch, num_classes: int, settings: LatencySettings) -> LatencyStats:
    """The whole network of ``arch`` on the target, at its resolution and the settings' batch."""
    model = build(arch, num_classes)
    return measure_module(model, (settings.batch_size, 3, arch.resolution, arch.resolution), settings)
