"""An ONNX file loaded in ONNX Runtime or OpenVINO and timed on the host clock.

This module imports nothing but the standard library, numpy and the runtime itself: it is what runs in the
measuring process (:mod:`nas.latency.measuring_process`), away from PyTorch, Lightning and the training data,
so that a runtime's own thread pools, allocators and copies of oneDNN never share a process with training
(in one process they changed the training's numerics, and a crash in a runtime took the whole search down).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
from collections.abc import Callable
from time import perf_counter

import numpy as np

ORT_LEVELS = ("disable", "basic", "extended", "all")


class SessionRefused(Exception):
    """The runtime cannot load or run this file; the message says why in one line."""


class RuntimeMissing(Exception):
    """The runtime's package is not installed where the measuring runs."""


def timed_calls(run: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Warm-up, then ``repeats`` calls timed on the host clock (CPU runtimes run synchronously), in ms."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        t0 = perf_counter()
        run()
        samples.append((perf_counter() - t0) * 1e3)
    return samples


def spread(samples_ms: list[float]) -> float:
    """Coefficient of variation (standard deviation / mean) of timed samples."""
    mean = statistics.fmean(samples_ms)
    return statistics.pstdev(samples_ms) / mean if mean > 0 else 0.0


def takes_until_steady(take: Callable[[], list[float]], max_cv: float, attempts: int) -> list[list[float]]:
    """Measurements taken until one spreads no more than ``max_cv``, ``attempts`` at most (the caller keeps the
    steadiest)."""
    takes = [take()]
    while spread(takes[-1]) > max_cv and len(takes) < attempts:
        takes.append(take())
    return takes


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def random_input(input_shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class OrtSessions:
    """``onnxruntime.InferenceSession`` with ``threads`` intra-op threads, sequential execution and the given
    graph optimisation."""

    name = "onnxruntime"

    def __init__(self, providers: list[str], optimization: str) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeMissing(first_line(exc)) from None
        self._ort, self.providers, self.optimization = ort, list(providers), optimization

    def describe(self) -> dict[str, object]:
        return {"version": self._ort.__version__, "available": self._ort.get_available_providers()}

    def open(self, path: str, input_shape: tuple[int, ...], threads: int) -> Callable[[], object]:
        ort = self._ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        levels = ort.GraphOptimizationLevel
        chosen = (levels.ORT_DISABLE_ALL, levels.ORT_ENABLE_BASIC, levels.ORT_ENABLE_EXTENDED, levels.ORT_ENABLE_ALL)
        options.graph_optimization_level = chosen[ORT_LEVELS.index(self.optimization)]
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are per network
        try:
            session = ort.InferenceSession(path, options, providers=self.providers)
            feed = {session.get_inputs()[0].name: random_input(input_shape)}
            session.run(None, feed)
        except Exception as exc:
            raise SessionRefused(f"onnxruntime cannot run the network: {first_line(exc)}") from None
        return lambda: session.run(None, feed)


class OpenVinoSessions:
    """The file compiled by OpenVINO's CPU plugin at the measured shape, with a performance hint, one stream,
    ``threads`` inference threads and an inference precision."""

    name = "openvino"

    def __init__(self, hint: str, precision: str) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeMissing(first_line(exc)) from None
        self._ov, self.hint, self.precision = ov, hint, precision
        self._core = ov.Core()  # OpenVINO unloads its plugin with the last Core: held as long as this object

    def describe(self) -> dict[str, object]:
        return {"version": self._ov.__version__, "available": list(self._core.available_devices)}

    def open(self, path: str, input_shape: tuple[int, ...], threads: int) -> Callable[[], object]:
        config = {
            "PERFORMANCE_HINT": self.hint,
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": self.precision,
        }
        try:
            model = self._core.read_model(path)
            model.reshape({model.inputs[0]: list(input_shape)})  # the shape it is deployed at, not a range
            compiled = self._core.compile_model(model, "CPU", config)
            request = compiled.create_infer_request()
            x = random_input(input_shape)
            request.infer({0: x})
        except Exception as exc:
            raise SessionRefused(f"OpenVINO cannot compile the network: {first_line(exc)}") from None
        return lambda: (compiled, request.infer({0: x}))  # the request never outlives its compiled model


SESSIONS: dict[str, type] = {"onnxruntime": OrtSessions, "openvino": OpenVinoSessions}
