"""TensorRT on a CUDA GPU: an engine built from the ONNX file at the measured shape, timed as TensorRT's own
``trtexec`` reports GPU compute time (CUDA events around ``execute_async_v3`` calls queued back to back)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nas.errors import NasError
from nas.latency.onnx_runtimes import ExportedRuntime
from nas.latency.runtime import RuntimeRefused, Sampler, cuda_event_samples

if TYPE_CHECKING:
    from nas.latency.measure import LatencySettings

PRECISIONS = ("fp32", "fp16")


class TensorRtRuntime(ExportedRuntime):
    name = "tensorrt"

    def __init__(self, precision: str = "fp32", workspace_mb: int = 1024, exporter: str = "torchscript") -> None:
        self._set_exporter(exporter)
        try:
            import tensorrt as trt
        except ImportError:
            raise NasError(
                "latency/runtime=tensorrt needs TensorRT: pip install tensorrt (on a CUDA machine)"
            ) from None
        if not torch.cuda.is_available():
            raise NasError("latency/runtime=tensorrt needs a CUDA GPU, and this machine has none")
        if precision not in PRECISIONS:
            raise NasError(f"latency.runtime.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
        self._trt, self.precision, self.workspace_mb = trt, precision, int(workspace_mb)
        self._logger = trt.Logger(trt.Logger.ERROR)

    def device(self) -> str | None:
        return "cuda"

    def check(self, device: str) -> None:
        if device != "cuda":
            raise NasError(
                f"latency.device={device} but latency/runtime=tensorrt runs on CUDA: set latency.device=cuda"
            )

    def identity(self) -> dict[str, object]:
        return {"name": self.name, "version": self._trt.__version__, "precision": self.precision,
                "exporter": self.exporter}  # fmt: skip

    def label(self) -> str:
        return f"{self.name}[{self.precision}]"

    def _engine(self, path: Path, input_shape: tuple[int, ...]) -> tuple[object, str]:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # explicit batch: TensorRT 10's only kind
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeRefused(f"TensorRT cannot parse the network: {errors[0] if errors else 'unknown error'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        name = network.get_input(0).name
        profile.set_shape(name, input_shape, input_shape, input_shape)  # the deployed shape, not a range
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeRefused("TensorRT cannot build an engine for the network (see its log at WARNING level)")
        return trt.Runtime(self._logger).deserialize_cuda_engine(serialized), name

    def prepare_file(self, path: Path, input_shape: tuple[int, ...], settings: LatencySettings) -> Sampler:
        trt = self._trt
        engine, input_name = self._engine(path, input_shape)
        context = engine.create_execution_context()
        context.set_input_shape(input_name, input_shape)
        buffers = {}  # the engine reads and writes these addresses: held by the sampler below
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.randn(tuple(context.get_tensor_shape(name)), device="cuda").to(dtype)
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.current_stream()

        def run() -> None:
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeRefused("TensorRT failed to run the engine")

        def take() -> list[float]:
            assert buffers, "the engine's buffers"  # referenced, so they live as long as this sampler
            return cuda_event_samples(run, settings)

        return take
