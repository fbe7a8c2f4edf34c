"""A retrained network as files: weights + architecture string + preprocessing, ONNX, torch.export.

The bundle is self-contained: ``arch.txt`` and ``weights.pt`` rebuild the
network with this project alone; ``preprocess.json`` is what ``nas.load``
needs to predict on raw images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nas.errors import NasError
from nas.image_resize import RESIZE
from nas.onnx_export import export_onnx_file
from nas.space import Arch


@dataclass
class Preprocess:
    resolution: int
    mean: list[float]
    std: list[float]
    channels: int  # of the source images: 1 (grayscale, repeated to 3) or 3
    classes: list[str]
    resize: str = RESIZE  # how images reach `resolution` (bundles written before the field: read as this one)
    image_size: int | None = None  # the side a folder's files were decoded to first (data.image_size), if any
    # What the network itself takes, whatever `channels` the images had: float32 (N, 3, resolution, resolution),
    # (x / 255 resized - mean) / std, grey images repeated to 3 channels.
    network_input: list[int] | None = None


def write_bundle(directory: Path, model: nn.Module, arch: Arch, pre: Preprocess) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "arch.txt").write_text(arch.encode() + "\n")
    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "preprocess.json").write_text(json.dumps(asdict(pre), indent=1))
    return directory


def within_tolerance(got: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> tuple[bool, float]:
    """Float32 kernels of another runtime differ in the last digits, more for larger logits: the worst
    difference is judged against ``rtol`` x the largest logit (at least 1)."""
    worst = float(np.abs(got - expected).max())
    return worst <= rtol * max(1.0, float(np.abs(expected).max())), worst


def export_onnx(model: nn.Module, resolution: int, path: Path) -> float:
    """ONNX with a dynamic batch dimension, re-loaded in onnxruntime and compared with PyTorch."""
    import onnxruntime as ort

    model = model.eval().cpu()
    export_onnx_file(model, (2, 3, resolution, resolution), path, "dynamo")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in (1, 5):
        x = torch.randn(n, 3, resolution, resolution)
        with torch.no_grad():
            expected = model(x).numpy()
        ok, diff = within_tolerance(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected)
        worst = max(worst, diff)
        if not ok:
            raise NasError(
                f"ONNX export of the model differs from PyTorch by {diff:.2e} (logits up to "
                f"{np.abs(expected).max():.2e}); not exported"
            )
    return worst


def export_program(model: nn.Module, resolution: int, path: Path) -> None:
    """torch.export with a dynamic batch dimension (the successor of TorchScript)."""
    model = model.eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.randn(2, 3, resolution, resolution),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    x = torch.randn(3, 3, resolution, resolution)
    with torch.no_grad():
        expected, got = model(x).numpy(), torch.export.load(str(path)).module()(x).numpy()
    ok, diff = within_tolerance(got, expected)
    if not ok:
        raise NasError(f"torch.export of the model differs from PyTorch by {diff:.2e}; not exported")
