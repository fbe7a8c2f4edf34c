"""A runtime that lacks an operator, as a real one may: ONNX Runtime that will not run graphs with HardSigmoid
(the gate of MobileNetV3's squeeze-and-excitation). Chosen in tests with
``latency.runtime._target_=tests.runtime_doubles.OnnxRuntimeWithoutHardSigmoid``."""

from __future__ import annotations

from pathlib import Path

import onnx

from nas.latency.onnx_runtimes import OnnxRuntime
from nas.latency.runtime import RuntimeRefused, Sampler


class OnnxRuntimeWithoutHardSigmoid(OnnxRuntime):
    def prepare_file(self, path: Path, input_shape: tuple[int, ...], settings) -> Sampler:
        if any(node.op_type == "HardSigmoid" for node in onnx.load(str(path)).graph.node):
            raise RuntimeRefused("onnxruntime cannot run the network: no kernel for HardSigmoid(6)")
        return super().prepare_file(path, input_shape, settings)
