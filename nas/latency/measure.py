"""Inference latency measured on the target device.

On CUDA the default is a CUDA-graph replay timed with CUDA events: eager
batch-1 latency there is mostly Python and launch overhead, which would rank
networks by layer count rather than by what they cost deployed. On CPU the
thread count is fixed and the median of repeated runs is reported.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from time import perf_counter

import torch
from torch import nn

from nas.errors import NasError
from nas.models import build
from nas.space import Arch

MODES = ("cudagraph", "eager")
# cuDNN's algorithm choice while measuring: its fixed heuristics, not autotuning. The setting is process-global
# and every trial's trainer sets it (train.cudnn_benchmark), so latency must not inherit the last trial's.
MEASURE_CUDNN_BENCHMARK = False
ATTEMPTS = 3  # a measurement noisier than max_cv is taken again, up to this many times in all
QUEUE_AHEAD_CYCLES = 2_000_000  # ~1 ms of GPU sleep before each timed sample, while the host queues it


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

    @property
    def effective_mode(self) -> str:
        """CUDA graphs exist only on CUDA; on CPU every measurement is eager."""
        return self.mode if self.device == "cuda" else "eager"

    def device_name(self) -> str:
        if self.device == "cuda":
            return torch.cuda.get_device_name()
        return cpu_name()

    def key_fields(self) -> dict[str, object]:
        """What a cached figure is valid for: device, torch version, batch, mode, threads."""
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
        return fields

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def cuda_backend_fields() -> dict[str, object]:
    """What else a CUDA figure depends on: the cuDNN version, its algorithm choice and TF32 use."""
    return {
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": MEASURE_CUDNN_BENCHMARK,
        "tf32": f"matmul={torch.backends.cuda.matmul.allow_tf32},cudnn={torch.backends.cudnn.allow_tf32}",
    }


@contextlib.contextmanager
def measuring_backends() -> Iterator[None]:
    """cuDNN's algorithm choice pinned while measuring, and restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = MEASURE_CUDNN_BENCHMARK
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float  # standard deviation / mean of the timed samples
    samples: int
    attempts: int = 1  # measurements taken (more than one when the first were noisier than max_cv)


def _stats(samples_ms: list[float]) -> LatencyStats:
    ordered = sorted(samples_ms)
    n = len(ordered)
    mean = statistics.fmean(ordered)
    return LatencyStats(
        median_ms=statistics.median(ordered),
        p10_ms=ordered[int(0.1 * (n - 1))],
        p90_ms=ordered[int(0.9 * (n - 1))],
        cv=statistics.pstdev(ordered) / mean if mean > 0 else 0.0,
        samples=n,
    )


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure_cpu(model: nn.Module, x: torch.Tensor, s: LatencySettings) -> list[float]:
    with cpu_threads(s.threads):
        for _ in range(s.warmup):
            model(x)
        samples = []
        for _ in range(s.repeats):
            t0 = perf_counter()
            model(x)
            samples.append((perf_counter() - t0) * 1e3)
    return samples


def _inner_count(run: callable, budget_ms: float = 2.0) -> int:  # type: ignore[valid-type]
    """Replays per timed sample, so that one sample spans about ``budget_ms`` (event resolution ~0.5 us)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return max(1, min(200, int(budget_ms / max(start.elapsed_time(end), 1e-3))))


def _measure_cuda(model: nn.Module, x: torch.Tensor, s: LatencySettings) -> list[float]:
    if s.mode == "cudagraph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)
        run = graph.replay
    else:

        def run() -> None:
            model(x)

    for _ in range(s.warmup):
        run()
    torch.cuda.synchronize()
    inner = _inner_count(run)
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(s.repeats):
        # The GPU sleeps while the host queues the sample's replays behind it, so the events time the
        # kernels back to back, not the host's launch gaps (which dominate microsecond table components).
        torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return samples


def measure_module(model: nn.Module, input_shape: tuple[int, ...], settings: LatencySettings) -> LatencyStats:
    """Median latency of ``model`` on a random input of ``input_shape`` (batch dimension included); taken
    again (up to ATTEMPTS in all) while its spread exceeds ``max_cv``, keeping the steadiest attempt."""
    device = torch.device(settings.device)
    model = model.to(device).eval()
    x = torch.randn(*input_shape, device=device)
    measure = _measure_cuda if settings.device == "cuda" else _measure_cpu
    with torch.no_grad(), measuring_backends():  # no_grad, not inference_mode: those tensors break capture
        return steadiest(lambda: measure(model, x, settings), settings.max_cv)


def steadiest(take: Callable[[], list[float]], max_cv: float, attempts: int = ATTEMPTS) -> LatencyStats:
    """The first attempt within ``max_cv``, else the least noisy of ``attempts``."""
    best: LatencyStats | None = None
    for attempt in range(1, attempts + 1):
        stats = _stats(take())
        if best is None or stats.cv < best.cv:
            best = replace(stats, attempts=attempt)
        if stats.cv <= max_cv:
            break
    assert best is not None
    return replace(best, attempts=attempt)


def measure_arch(arch: Arch, num_classes: int, settings: LatencySettings) -> LatencyStats:
    """The whole network of ``arch`` on the target, at its resolution and the settings' batch."""
    model = build(arch, num_classes)
    return measure_module(model, (settings.batch_size, 3, arch.resolution, arch.resolution), settings)
