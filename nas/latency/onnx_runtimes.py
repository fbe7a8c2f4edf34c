"""Runtimes that execute the exported ONNX file: ONNX Runtime (any execution provider) and OpenVINO.

Each network, and each table layer, is exported the way the retrain exports the model it registers
(:func:`nas.onnx_export.export_onnx_file`), then loaded and timed by the runtime's own session API in a
measuring process of its own (:mod:`nas.latency.measuring_process`), with ``latency.threads`` threads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from nas.errors import NasError
from nas.latency.measure import ATTEMPTS
from nas.latency.measuring_process import MeasuringFailed, MeasuringProcess, RuntimeNotInstalled, measuring_process
from nas.latency.runtime import RuntimeRefused, Sampler
from nas.latency.sessions import ORT_LEVELS, first_line
from nas.onnx_export import EXPORTERS, export_onnx_file

if TYPE_CHECKING:
    from nas.latency.measure import LatencySettings
    from nas.latency.remote import RemoteMeasurer

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class ExportedRuntime:
    """What the ONNX runtimes share: a network is exported to a temporary file, which the runtime loads."""

    name = "onnx"
    exporter = "torchscript"  # see nas.onnx_export: the fast tracer, so that tables stay affordable
    target = "local"  # or a latency agent's http://host:port (latency.target)

    def _set_exporter(self, exporter: str) -> None:
        if exporter not in EXPORTERS:
            raise NasError(f"latency.runtime.exporter={exporter!r} is not one of {', '.join(EXPORTERS)}")
        self.exporter = exporter

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler:
        with tempfile.TemporaryDirectory(prefix="nas-latency-") as tmp:
            try:
                path = export_onnx_file(model, input_shape, Path(tmp) / "model.onnx", self.exporter)
            except Exception as exc:
                raise RuntimeRefused(f"the network cannot be exported to ONNX: {first_line(exc)}") from None
            return self.prepare_file(path, input_shape, settings)  # the runtime holds the model once loaded

    def _start(self, options: dict[str, Any], missing: str, target: str) -> None:
        """The runtime's measuring process here, or the latency agent at ``target`` (``latency.target``)."""
        if target != "local":
            from nas.latency.remote import RemoteMeasurer

            self.target = target
            self._process: MeasuringProcess | RemoteMeasurer = RemoteMeasurer(target, self.name, options)
        else:
            try:
                self._process = measuring_process(self.name, options)
            except RuntimeNotInstalled:
                raise NasError(missing) from None
        self.version = str(self._process.described["version"])
        self.available = list(self._process.described["available"])

    def device_name(self) -> str | None:
        """The agent's processor when measuring on another device; None: this machine's."""
        return str(self._process.described["cpu"]) if self.target != "local" else None

    def _with_target(self, identity: dict[str, object]) -> dict[str, object]:
        """A figure from an agent is the device's: its host and processor, not the tunnel's address."""
        if self.target != "local":
            identity["target"] = {"host": self._process.described["host"], "cpu": self._process.described["cpu"]}
        return identity

    def _at_target(self, label: str) -> str:
        return label if self.target == "local" else f"{label}@{self._process.described['host']}"

    def prepare_file(self, path: Path, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler:
        """The file loaded in the runtime's measuring process (or agent), timed there with the settings'
        threads."""
        try:
            take = self._process.sampler(path, input_shape, settings.threads, settings.warmup, settings.repeats,
                                         settings.max_cv, ATTEMPTS)  # fmt: skip
        except MeasuringFailed as exc:
            raise RuntimeRefused(str(exc)) from None

        def measured() -> list[float]:
            try:
                return take()
            except MeasuringFailed as exc:
                raise RuntimeRefused(str(exc)) from None

        return measured


class OnnxRuntime(ExportedRuntime):
    """An ``onnxruntime.InferenceSession`` with ``latency.threads`` intra-op threads, sequential execution and
    the configured graph optimisation (``all``: the fusions a deployment gets)."""

    name = "onnxruntime"

    def __init__(
        self,
        providers: list[str] | None = None,
        optimization: str = "all",
        exporter: str = "torchscript",
        target: str = "local",
    ) -> None:
        self._set_exporter(exporter)
        if optimization not in ORT_LEVELS:
            raise NasError(f"latency.runtime.optimization={optimization!r} is not one of {', '.join(ORT_LEVELS)}")
        self.providers, self.optimization = list(providers or ["CPUExecutionProvider"]), optimization
        self._start(
            {"providers": self.providers, "optimization": optimization},
            "latency/runtime=onnxruntime needs ONNX Runtime: pip install onnxruntime (onnxruntime-gpu for the "
            "CUDA and TensorRT execution providers)",
            target,
        )
        missing = [p for p in self.providers if p not in self.available]
        if missing:
            hint = " (pip install onnxruntime-gpu, on a machine with CUDA)" if missing[0] in GPU_PROVIDERS else ""
            raise NasError(
                f"latency.runtime.providers: {missing[0]} is not available here{hint}; this onnxruntime "
                f"{self.version} has {', '.join(self.available)}"
            )

    def device(self) -> str | None:
        return "cuda" if any(p in GPU_PROVIDERS for p in self.providers) else "cpu"

    def check(self, device: str) -> None:
        if device != self.device():
            raise NasError(
                f"latency.device={device} but the execution providers {', '.join(self.providers)} run on "
                f"{self.device()}: set latency.device={self.device()} or latency.runtime.providers"
            )

    def identity(self) -> dict[str, object]:
        return self._with_target(
            {
                "name": self.name,
                "version": self.version,
                "providers": self.providers,
                "optimization": self.optimization,
                "exporter": self.exporter,
            }
        )

    def label(self) -> str:
        return self._at_target(f"{self.name}[{','.join(p.removesuffix('ExecutionProvider') for p in self.providers)}]")


class OpenVinoRuntime(ExportedRuntime):
    """The ONNX file compiled by OpenVINO for its CPU plugin with the latency performance hint, one stream,
    ``latency.threads`` inference threads, at the measured input shape; ``precision`` is the inference
    precision hint (``f32`` keeps the trained network's numbers; ``bf16`` where the CPU has AMX and the
    deployment uses it)."""

    name = "openvino"

    def __init__(
        self, hint: str = "LATENCY", precision: str = "f32", exporter: str = "torchscript", target: str = "local"
    ) -> None:
        self._set_exporter(exporter)
        self.hint, self.precision = hint, precision
        self._start({"hint": hint, "precision": precision},
                    "latency/runtime=openvino needs OpenVINO: pip install -e '.[openvino]'", target)  # fmt: skip
        if "CPU" not in self.available:
            raise NasError(f"OpenVINO {self.version} finds no CPU plugin here (devices: {self.available})")

    def device(self) -> str | None:
        return "cpu"

    def check(self, device: str) -> None:
        if device != "cpu":
            raise NasError(
                f"latency.device={device} but latency/runtime=openvino runs on the CPU: set latency.device=cpu"
            )

    def identity(self) -> dict[str, object]:
        return self._with_target(
            {
                "name": self.name,
                "version": self.version,
                "hint": self.hint,
                "precision": self.precision,
                "exporter": self.exporter,
            }
        )

    def label(self) -> str:
        return self._at_target(f"{self.name}[CPU,{self.precision}]")
