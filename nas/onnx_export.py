"""A network as an ONNX file, written one way for both users of it: the retrain's registered ``model.onnx`` and
every network or table layer a runtime times (so the file whose latency is reported is the one shipped)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

MAX_BATCH = 4096


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints its progress ("[torch.onnx] Obtain model graph ...") and warns about its own
    internals on every call: noise in a search that exports a network per trial."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


EXPORTERS = ("torchscript", "dynamo")


def export_onnx_file(model: nn.Module, input_shape: tuple[int, ...], path: Path, exporter: str = "dynamo") -> Path:
    """``model`` (in eval mode, on the CPU) as ONNX at ``path`` with its weights inside, traced at
    ``input_shape`` with a dynamic batch dimension. ``dynamo``: the torch.export-based exporter (PyTorch's
    default, what the retrain registers); ``torchscript``: the older tracer, deprecated but about ten times
    faster (~0.3 s against ~5 s for a MobileNetV3), which is what makes a per-layer table of a thousand layers
    affordable. Both give ONNX Runtime the same convolutions to fuse (``benchmarks/runtime_ranking.py``
    compares their latencies)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    model = model.eval().cpu()
    example = torch.randn(max(2, input_shape[0]), *input_shape[1:])  # batch 1 would be specialised away
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            torch.onnx.export(model, (example,), str(path), dynamic_shapes=({0: batch},), dynamo=True,
                              external_data=False, verbose=False)  # fmt: skip
        else:
            names = {"input_names": ["input"], "output_names": ["output"]}
            torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes={"input": {0: "batch"}},
                              opset_version=18, **names)  # fmt: skip
    return path
