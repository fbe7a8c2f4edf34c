"""Runtimes that fail as real ones may, chosen in tests with ``latency.runtime._target_=tests.runtime_doubles.NAME``:
ONNX Runtime that will not run graphs with HardSigmoid (the gate of MobileNetV3's squeeze-and-excitation), and
PyTorch whose CUDA-graph capture of a network fails."""

from __future__ import annotations

from pathlib import Path

import onnx

from nas.latency.onnx_runtimes import OnnxRuntime
from nas.latency.runtime import RuntimeRefused, Sampler, TorchRuntime


class OnnxRuntimeWithoutHardSigmoid(OnnxRuntime):
    def prepare_file(self, path: Path, input_shape: tuple[int, ...], settings) -> Sampler:
        if any(node.op_type == "HardSigmoid" for node in onnx.load(str(path)).graph.node):
            raise RuntimeRefused("onnxruntime cannot run the network: no kernel for HardSigmoid(6)")
        return super().prepare_file(path, input_shape, settings)


CAPTURE_ERROR = "operation not permitted when stream is capturing"  # what CUDA says of a host sync in a capture


def failing_capture(model, x):
    raise RuntimeError(f"CUDA error: {CAPTURE_ERROR}\nCUDA kernel errors might be asynchronously reported ...")


class TorchRuntimeWhoseCaptureFails(TorchRuntime):
    """PyTorch asked for CUDA-graph replays of networks that cannot be captured (one with an operator that syncs
    with the host, say). A CPU has no graphs, so this double asks for one anyway and makes its capture fail as
    CUDA's does: what follows (eager timing, the warning, the figure's label) is the product's own code."""

    def prepare(self, model, input_shape, settings) -> Sampler:
        sampler = super().prepare(model, input_shape, settings)
        sampler.mode, sampler.capture = "cudagraph", failing_capture
        return sampler
