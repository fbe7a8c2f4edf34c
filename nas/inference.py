"""``nas.load``: a found model, ready to predict on images, in the build / fit / predict / save style."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas.errors import NasError
from nas.image_resize import RESIZE, decode_stored, resize_images, stored_size
from nas.models import build
from nas.retrain.export import Preprocess, write_bundle
from nas.space import decode

ImageLike = Any  # a path, a file's bytes, a PIL image, an (H, W[, C]) uint8 array, or a (C, H, W) uint8 tensor


class Classifier:
    """A network plus the preprocessing it was trained with."""

    def __init__(self, model: torch.nn.Module, pre: Preprocess, arch_text: str) -> None:
        self.model = model.eval()
        self.pre = pre
        self.arch = decode(arch_text)
        self.classes = list(pre.classes)
        self._mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(pre.std).view(1, -1, 1, 1)

    def _tensor(self, image: ImageLike) -> torch.Tensor:
        """uint8 (C, H, W) as training stored it: a folder's files decoded to ``image_size`` the way the data
        loader decodes them (JPEG draft included), other images resized to it."""
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        if isinstance(image, bytes | bytearray):  # a file's contents (what a served request carries)
            image = io.BytesIO(image)
        if isinstance(image, str | Path | io.BytesIO):
            with Image.open(image) as pil:
                return self._tensor(pil)
        if isinstance(image, Image.Image) and self.pre.image_size is not None:
            return decode_stored(image, self.pre.image_size)  # RGB: folders are decoded as RGB
        if isinstance(image, Image.Image):
            image = image.convert("L" if self.pre.channels == 1 else "RGB")
            t = TF.pil_to_tensor(image)
        elif isinstance(image, np.ndarray):
            t = torch.from_numpy(image)
            t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        elif isinstance(image, torch.Tensor):
            t = image.unsqueeze(0) if image.ndim == 2 else image
        else:
            raise NasError(f"cannot predict on {type(image).__name__}; pass paths, PIL images, arrays or tensors")
        if t.shape[0] == 3 and self.pre.channels == 1:
            t = TF.rgb_to_grayscale(t)
        if t.shape[0] == 1 and self.pre.channels == 3:
            t = t.expand(3, -1, -1)
        return stored_size(t, self.pre.image_size)

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """The training's own decode and resize (``nas.image_resize``), image by image (sizes may differ)."""
        res = self.pre.resolution
        x = torch.cat([resize_images(self._tensor(i).float().div(255).unsqueeze(0), res) for i in images])
        x = (x - self._mean) / self._std
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @torch.no_grad()
    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        return torch.softmax(self.model(self.preprocess(images)), dim=1).numpy()

    def predict(self, images: Sequence[ImageLike]) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(images).argmax(axis=1)]

    def save(self, directory: str | Path) -> Path:
        return write_bundle(Path(directory), self.model, self.arch, self.pre)


def _tracking_uri(given: str | None) -> str:
    """The store a ``models:/`` or ``runs:/`` name is looked up in: the one given, else MLflow's own
    setting (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``), else the project's default store
    (conf/mlflow/default.yaml) when it exists here. Never MLflow's fallback ``./mlflow.db``: it would
    be created empty and the model "not found" in it."""
    from mlflow.tracking import get_tracking_uri, is_tracking_uri_set

    from nas.cli import default_tracking_uri

    if given:
        return given
    if is_tracking_uri_set():
        return get_tracking_uri()
    default = default_tracking_uri()
    local = Path(default.removeprefix("sqlite:///"))
    if default.startswith("sqlite:///") and local.is_file():
        return f"sqlite:///{local.resolve()}"
    raise NasError(
        f"no MLflow store to look the model up in: {local} does not exist in {Path.cwd()}. Run from the project "
        "folder the search ran in, or pass tracking_uri= (or set MLFLOW_TRACKING_URI)"
    )


def _resolve(source: str | Path, tracking_uri: str | None) -> Path:
    """A local bundle folder, ``runs:/ID/bundle``, or ``models:/NAME/VERSION|@alias|latest``."""
    text = str(source)
    if Path(text).is_dir():
        return Path(text)
    if not text.startswith(("models:/", "runs:/")):
        raise NasError(f"cannot load {text!r}: give a bundle folder, runs:/RUN_ID/bundle or models:/NAME/VERSION")
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = _tracking_uri(tracking_uri)
    if text.startswith("models:/"):
        client = MlflowClient(tracking_uri=uri)
        ref = text.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, ver = ref.partition("/")
            if ver in ("", "latest"):
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise NasError(f"registered model {name!r} has no versions")
                version = max(versions, key=lambda v: int(v.version))
            else:
                version = client.get_model_version(name, ver)
        text = f"runs:/{version.run_id}/bundle"
    return Path(mlflow.artifacts.download_artifacts(text, tracking_uri=uri))


def load(source: str | Path, tracking_uri: str | None = None) -> Classifier:
    """Load a retrained model for prediction, e.g. ``nas.load("models:/nas-mbv3-cifar10@champion")``
    in the folder the search ran in, or with ``tracking_uri=`` naming the MLflow store."""
    folder = _resolve(source, tracking_uri)
    missing = [f for f in ("arch.txt", "weights.pt", "preprocess.json") if not (folder / f).is_file()]
    if missing:
        raise NasError(f"{folder} is not a nas model bundle (missing {', '.join(missing)})")
    arch_text = (folder / "arch.txt").read_text().strip()
    pre = Preprocess(**json.loads((folder / "preprocess.json").read_text()))
    if pre.resize != RESIZE:
        raise NasError(
            f"{folder} was made with the resize {pre.resize!r}, and this version of nas resizes with {RESIZE!r}: "
            "load it with the nas version that made it"
        )
    model = build(decode(arch_text), num_classes=len(pre.classes))
    model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    return Classifier(model, pre, arch_text)
