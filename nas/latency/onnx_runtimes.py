"""Runtimes that execute the exported ONNX file: ONNX Runtime (any execution provider) and OpenVINO.

Each network, and each table layer, is exported the way the retrain exports the model it registers
(:func:`nas.onnx_export.export_onnx_file`), compiled by the runtime with ``latency.threads`` threads, and
timed through the runtime's own session API on the host clock.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from nas.errors import NasError
from nas.latency.runtime import RuntimeRefused, Sampler, host_samples
from nas.onnx_export import EXPORTERS, export_onnx_file

if TYPE_CHECKING:
    from nas.latency.measure import LatencySettings

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
ORT_LEVELS = ("disable", "basic", "extended", "all")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _random_input(input_shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)


class ExportedRuntime:
    """What the ONNX runtimes share: a network is exported to a temporary file, which the runtime loads."""

    name = "onnx"
    exporter = "torchscript"  # see nas.onnx_export: the fast tracer, so that tables stay affordable

    def _set_exporter(self, exporter: str) -> None:
        if exporter not in EXPORTERS:
            raise NasError(f"latency.runtime.exporter={exporter!r} is not one of {', '.join(EXPORTERS)}")
        self.exporter = exporter

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler:
        with tempfile.TemporaryDirectory(prefix="nas-latency-") as tmp:
            try:
                path = export_onnx_file(model, input_shape, Path(tmp) / "model.onnx", self.exporter)
            except Exception as exc:
                raise RuntimeRefused(f"the network cannot be exported to ONNX: {_first_line(exc)}") from None
            return self.prepare_file(path, input_shape, settings)  # the runtime holds the model once loaded

    def prepare_file(self, path: Path, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler:
        raise NotImplementedError


class OnnxRuntime(ExportedRuntime):
    """An ``onnxruntime.InferenceSession`` with ``latency.threads`` intra-op threads, sequential execution and
    the configured graph optimisation (``all``: the fusions a deployment gets)."""

    name = "onnxruntime"

    def __init__(
        self, providers: list[str] | None = None, optimization: str = "all", exporter: str = "torchscript"
    ) -> None:
        self._set_exporter(exporter)
        try:
            import onnxruntime as ort
        except ImportError:
            raise NasError(
                "latency/runtime=onnxruntime needs ONNX Runtime: pip install onnxruntime (onnxruntime-gpu for "
                "the CUDA and TensorRT execution providers)"
            ) from None
        self.providers = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            hint = " (pip install onnxruntime-gpu, on a machine with CUDA)" if missing[0] in GPU_PROVIDERS else ""
            raise NasError(
                f"latency.runtime.providers: {missing[0]} is not available here{hint}; this onnxruntime "
                f"{ort.__version__} has {', '.join(available)}"
            )
        if optimization not in ORT_LEVELS:
            raise NasError(f"latency.runtime.optimization={optimization!r} is not one of {', '.join(ORT_LEVELS)}")
        self.optimization = optimization
        self._ort = ort

    def device(self) -> str | None:
        return "cuda" if any(p in GPU_PROVIDERS for p in self.providers) else "cpu"

    def check(self, device: str) -> None:
        if device != self.device():
            raise NasError(
                f"latency.device={device} but the execution providers {', '.join(self.providers)} run on "
                f"{self.device()}: set latency.device={self.device()} or latency.runtime.providers"
            )

    def identity(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self._ort.__version__,
            "providers": self.providers,
            "optimization": self.optimization,
            "exporter": self.exporter,
        }

    def label(self) -> str:
        return f"{self.name}[{','.join(p.removesuffix('ExecutionProvider') for p in self.providers)}]"

    def _options(self, settings: LatencySettings) -> Any:
        ort = self._ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        levels = ort.GraphOptimizationLevel
        options.graph_optimization_level = {
            "disable": levels.ORT_DISABLE_ALL,
            "basic": levels.ORT_ENABLE_BASIC,
            "extended": levels.ORT_ENABLE_EXTENDED,
            "all": levels.ORT_ENABLE_ALL,
        }[self.optimization]
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are per network
        return options

    def prepare_file(self, path: Path, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler:
        try:
            session = self._ort.InferenceSession(str(path), self._options(settings), providers=self.providers)
            feed = {session.get_inputs()[0].name: _random_input(input_shape)}
            session.run(None, feed)
        except Exception as exc:
            raise RuntimeRefused(f"onnxruntime cannot run the network: {_first_line(exc)}") from None

        def take() -> list[float]:
            return host_samples(lambda: session.run(None, feed), settings)

        return take


class OpenVinoRuntime(ExportedRuntime):
    """The ONNX file compiled by OpenVINO for its CPU plugin with the latency performance hint, one stream,
    ``latency.threads`` inference threads, at the measured input shape; ``precision`` is the inference
    precision hint (``f32`` keeps the trained network's numbers; ``bf16`` where the CPU has AMX and the
    deployment uses it)."""

    name = "openvino"

    def __init__(self, hint: str = "LATENCY", precision: str = "f32", exporter: str = "torchscript") -> None:
        self._set_exporter(exporter)
        try:
            import openvino as ov
        except ImportError:
            raise NasError("latency/runtime=openvino needs OpenVINO: pip install -e '.[openvino]'") from None
        self._core = ov.Core()
        if "CPU" not in self._core.available_devices:
            raise NasError(
                f"OpenVINO {ov.__version__} finds no CPU plugin here (devices: {self._core.available_devices})"
            )
        self._ov = ov
        self.hint, self.precision = hint, precision

    def device(self) -> str | None:
        return "cpu"

    def check(self, device: str) -> None:
        if device != "cpu":
            raise NasError(
                f"latency.device={device} but latency/runtime=openvino runs on the CPU: set latency.device=cpu"
            )

    def identity(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self._ov.__version__,
            "hint": self.hint,
            "precision": self.precision,
            "exporter": self.exporter,
        }

    def label(self) -> str:
        return f"{self.name}[CPU,{self.precision}]"

    def prepare_file(self, path: Path, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler:
        config = {
            "PERFORMANCE_HINT": self.hint,
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(settings.threads),
            "INFERENCE_PRECISION_HINT": self.precision,
        }
        try:
            model = self._core.read_model(str(path))
            model.reshape({model.inputs[0]: list(input_shape)})  # the shape it is deployed at, not a range
            compiled = self._core.compile_model(model, "CPU", config)
            request = compiled.create_infer_request()
            x = _random_input(input_shape)
            request.infer({0: x})
        except Exception as exc:
            raise RuntimeRefused(f"OpenVINO cannot compile the network: {_first_line(exc)}") from None

        core = self._core  # OpenVINO unloads its plugin with the last Core: a request must never outlive it

        def take() -> list[float]:
            assert core is not None and compiled is not None  # held as long as the request is
            return host_samples(lambda: request.infer({0: x}), settings)

        return take
