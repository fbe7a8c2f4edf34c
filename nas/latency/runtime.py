"""Where a latency figure is taken: the runtime the network ships with.

PyTorch eager on a CPU is dominated by per-operator overhead and ranks networks by how many operators they
have; ONNX Runtime, OpenVINO and TensorRT fuse conv + BN + activation and pick kernels per shape, so they rank
them differently (``benchmarks/runtime_ranking.py``). A runtime is a small object behind :class:`Runtime`,
chosen with ``latency/runtime=NAME`` (a file ``conf/latency/runtime/NAME.yaml`` naming its ``_target_``):
it turns a network, or an ONNX file, into a function that takes timed samples.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from nas.errors import NasError
from nas.latency.sessions import timed_calls

if TYPE_CHECKING:
    from nas.latency.measure import LatencySettings

# Takes one measurement: warm-up, then ``repeats`` timed inferences, in milliseconds each.
Sampler = Callable[[], list[float]]

# cuDNN's algorithm choice while measuring: its fixed heuristics, not autotuning. The setting is process-global
# and every trial's trainer sets it (train.cudnn_benchmark), so latency must not inherit the last trial's.
MEASURE_CUDNN_BENCHMARK = False
QUEUE_AHEAD_CYCLES = 2_000_000  # ~1 ms of GPU sleep before each timed sample, while the host queues it


class RuntimeRefused(NasError):
    """The runtime cannot compile or run this network (an unsupported operator, a shape it rejects): the
    trial that drew it fails with this reason, and the search goes on."""


class Runtime(Protocol):
    name: str

    def device(self) -> str | None:
        """cpu or cuda where the runtime runs on one kind of device only; None where ``latency.device`` says."""
        ...

    def check(self, device: str) -> None:
        """Stop at once, naming the install command or the setting to change, when this machine cannot run it."""
        ...

    def identity(self) -> dict[str, object]:
        """Name, version and options (providers, precision): part of a cached figure's key and of MLflow params."""
        ...

    def label(self) -> str:
        """One word for lines and a study's identity, e.g. ``onnxruntime[CPUExecutionProvider]``."""
        ...

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler: ...


class FileRuntime(Runtime, Protocol):
    """A runtime that executes an exported ONNX file: the retrain times the file it registers."""

    def prepare_file(self, path: Path, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler: ...


def host_samples(run: Callable[[], object], settings: LatencySettings) -> list[float]:
    """Warm-up, then ``repeats`` calls timed on the host clock (CPU runtimes run synchronously)."""
    return timed_calls(run, settings.warmup, settings.repeats)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def measuring_backends() -> Iterator[None]:
    """cuDNN's algorithm choice pinned while measuring, and restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = MEASURE_CUDNN_BENCHMARK
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def cuda_backend_fields() -> dict[str, object]:
    """What else a CUDA figure depends on: the cuDNN version, its algorithm choice and TF32 use."""
    return {
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": MEASURE_CUDNN_BENCHMARK,
        "tf32": f"matmul={torch.backends.cuda.matmul.allow_tf32},cudnn={torch.backends.cudnn.allow_tf32}",
    }


def _inner_count(run: Callable[[], object], budget_ms: float = 2.0) -> int:
    """Replays per timed sample, so that one sample spans about ``budget_ms`` (event resolution ~0.5 us)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return max(1, min(200, int(budget_ms / max(start.elapsed_time(end), 1e-3))))


def cuda_event_samples(run: Callable[[], object], settings: LatencySettings) -> list[float]:
    """GPU time per call from CUDA events, ``inner`` calls per sample queued behind a GPU sleep, so that the
    events time the kernels back to back, not the host's launch gaps (which dominate microsecond layers)."""
    for _ in range(settings.warmup):
        run()
    torch.cuda.synchronize()
    inner = _inner_count(run)
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(settings.repeats):
        torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return samples


def _cuda_graph(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def capture_failure(err: BaseException) -> str:
    """The first line of why a capture failed (PyTorch's CUDA errors run to many lines of advice)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


class TorchSampler:
    """Times ``model(x)``. On CUDA with ``latency.mode=cudagraph`` the network is captured as a CUDA graph at the
    first call and replayed; a network that cannot be captured (an operator that syncs with the host, say) is
    timed eagerly instead, with one warning line, and says so: ``mode`` is the mode its figures come from,
    ``fallback`` why it is not the configured one. A search then keeps a figure for such a network rather than
    failing its trial, and the figure is labelled (trial attribute, MLflow tag)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, settings: LatencySettings,
                 capture: Callable[[nn.Module, torch.Tensor], Callable[[], object]] = _cuda_graph) -> None:  # fmt: skip
        self.model, self.x, self.settings, self.capture = model, x, settings, capture
        self.mode = settings.effective_mode
        self.fallback: str | None = None
        self._run: Callable[[], object] | None = None

    def __call__(self) -> list[float]:
        with torch.no_grad(), measuring_backends():  # no_grad, not inference_mode: those tensors break capture
            run = self.runner()
            if self.settings.device == "cpu":
                with cpu_threads(self.settings.threads):
                    return host_samples(run, self.settings)
            return cuda_event_samples(run, self.settings)

    def eager(self) -> object:
        return self.model(self.x)

    def runner(self) -> Callable[[], object]:
        """The graph's replay, or eager calls when the settings ask for them or the capture fails."""
        if self._run is None:
            self._run = self.eager
            if self.mode == "cudagraph":
                try:
                    self._run = self.capture(self.model, self.x)
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError as err:
                    self.mode, self.fallback = "eager", capture_failure(err)
                    print(f"warning: CUDA-graph capture of the network failed ({self.fallback}); its latency is "
                          "measured eagerly (launch overhead included)", file=sys.stderr, flush=True)  # fmt: skip
        return self._run


class TorchRuntime:
    """PyTorch itself: eager on CPU with ``latency.threads`` threads; on CUDA a CUDA-graph replay
    (``latency.mode=cudagraph``, deployment-like) or eager launches."""

    name = "torch"

    def device(self) -> str | None:
        return None

    def check(self, device: str) -> None:
        return None

    def identity(self) -> dict[str, object]:
        return {"name": self.name, "version": torch.__version__}

    def label(self) -> str:
        return self.name

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler:
        device = torch.device(settings.device)
        return TorchSampler(model.to(device).eval(), torch.randn(*input_shape, device=device), settings)


def runtime_option_dir() -> Path:
    from nas.cli import CONF_DIR

    return Path(CONF_DIR) / "latency" / "runtime"


def _node_of_name(name: str) -> Any:
    """``latency.runtime=NAME`` (a plain key, not the group) names a file of the group: read that file."""
    from omegaconf import OmegaConf

    path = runtime_option_dir() / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in runtime_option_dir().glob("*.yaml"))
        raise NasError(
            f"latency.runtime={name} is not one of {', '.join(options)}; add a file latency/runtime/{name}.yaml "
            "(its _target_ a runtime class) to a config folder and choose it with latency/runtime={name}"
        )
    return OmegaConf.load(path)


def runtime_config(node: Any, target: str | None = None) -> dict[str, Any]:
    """The runtime's settings as plain data (what a study keeps, so its retrain measures alike): a group option,
    an option's name (``latency.runtime=NAME``) or nothing (PyTorch); with ``latency.target`` when it names
    an agent on another device."""
    from omegaconf import DictConfig, OmegaConf

    if node is None:
        node = {"_target_": f"{TorchRuntime.__module__}.{TorchRuntime.__qualname__}"}
    if isinstance(node, str):
        node = _node_of_name(node)
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or not node.get("_target_"):
        raise NasError("latency.runtime needs a _target_ (choose one with latency/runtime=onnxruntime)")
    config = dict(node)
    if target not in (None, "local"):
        from nas.latency.remote import check_target

        config["target"] = check_target(str(target))
    return config


def make_runtime(node: Any, target: str | None = None) -> Runtime:
    """The configured runtime (see :func:`runtime_config`); one that cannot run here stops at once."""
    from hydra.utils import get_class, instantiate

    config = runtime_config(node, target)
    if "target" in config:
        from nas.latency.onnx_runtimes import ExportedRuntime

        try:
            runs_onnx = issubclass(get_class(config["_target_"]), ExportedRuntime)
        except Exception:  # a class that cannot be found is reported below
            runs_onnx = True
        if not runs_onnx:
            raise NasError(f"latency.target={config['target']} sends ONNX files to an agent: choose a runtime "
                               "that runs them, latency/runtime=onnxruntime or latency/runtime=openvino")  # fmt: skip
    target = config["_target_"]
    try:
        runtime = instantiate(config, _convert_="all")
    except Exception as exc:  # hydra wraps import errors and bad arguments
        if isinstance(exc.__cause__, NasError):  # the runtime's own refusal (not installed, no such provider)
            raise exc.__cause__ from None
        reason = str(exc).splitlines()[0][:300]
        raise NasError(f"latency.runtime: cannot create {target}: {reason}") from None
    if not callable(getattr(runtime, "prepare", None)):
        raise NasError(f"latency.runtime: {target} is not a runtime (it has no prepare method)")
    return runtime
