"""The registered model as MLflow serves it: raw images in, classes and probabilities out.

``mlflow.pyfunc.load_model(...).predict`` and ``mlflow models serve`` get the network together with the
preprocessing it was trained with (decode, resize, normalisation, grey to RGB), from the same bundle and
through the same code as ``nas.load``: a served prediction is the one ``nas.load`` makes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

IMAGE_COLUMN = "image"  # the input column: an image file's bytes (JSON requests: base64), or a path
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
    outputs=Schema([
        ColSpec(DataType.string, "class"),
        ColSpec(DataType.long, "class_index"),
        ColSpec(DataType.double, "probability"),
        ColSpec(Array(DataType.double), "probabilities"),
    ]),
)  # fmt: skip
PACKAGE = Path(__file__).resolve().parents[1]  # nas/, shipped with the model (code_paths)


def images_of(model_input: Any) -> list[Any]:
    """A DataFrame's image column (bytes or paths), a list of images, or a batch array, as ``nas.load`` takes them."""
    if isinstance(model_input, pd.DataFrame):
        column = IMAGE_COLUMN if IMAGE_COLUMN in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8 and model_input.ndim in (3, 4):
        return list(model_input)  # (N, H, W) or (N, H, W, C)
    return list(model_input)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """MLflow's python_function around a nas bundle (the ``bundle`` artifact)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from nas.inference import load

        self.classifier = load(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        proba = self.classifier.predict_proba(images_of(model_input)).astype(np.float64)
        index = proba.argmax(axis=1)
        return pd.DataFrame({
            "class": [self.classifier.classes[i] for i in index],
            "class_index": index.astype(np.int64),
            "probability": proba[np.arange(len(index)), index],
            "probabilities": list(proba),
        })  # fmt: skip


def example_input(resolution: int, channels: int) -> pd.DataFrame:
    """One PNG of the network's size, as a request carries it: MLflow checks the logged model on it."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert("L" if channels == 1 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})


def log_serving_model(bundle: Path, resolution: int, channels: int, registered_name: str | None) -> Any:
    """Log (and register) the python_function model of ``bundle`` as the run's ``model`` artifact."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("serving_model.py")),  # a model from code: nothing pickled
        artifacts={"bundle": str(bundle)},
        code_paths=[str(PACKAGE)],
        signature=SIGNATURE,
        input_example=example_input(resolution, channels),
        registered_model_name=registered_name,
    )
