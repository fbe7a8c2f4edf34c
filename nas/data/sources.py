"""Data sets as decoded uint8 tensors, read through torchvision's own dataset classes.

Each loader returns :class:`ImageSplits`; the data module carves the
validation split and does the augmentation. A data set that is missing and
cannot be downloaded raises :class:`DataError` naming the set, the root and
the fixes, instead of torchvision's bare "Dataset not found".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from nas.errors import NasError


class DataError(NasError):
    """A data set that cannot be loaded."""


@dataclass
class ImageSplits:
    """Decoded images (N, C, H, W) uint8 with int64 labels; ``test`` is None when the set has no test split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: list[str]
    source_fingerprint: str | None = None  # set by loaders that read user files (see fingerprint())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = (int(v) for v in self.train_x.shape[1:])
        return c, h, w

    @property
    def has_test(self) -> bool:
        return self.test_x is not None

    def fingerprint(self) -> str:
        """What the data is, wherever its files live: studies keep it so trials trained on other data never mix.

        Image folders: a digest of their files' bytes, relative paths and labels, taken while decoding and
        kept with the decode cache (stable across copies and machines, where mtimes and decoded JPEG
        pixels may differ). Built-in sets: a digest of the decoded images, labels and classes (about
        0.1 s per 100 MB).
        """
        if self.source_fingerprint is not None:
            return self.source_fingerprint
        h = hashlib.blake2b(digest_size=16)
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            if t is None:
                h.update(b"none")
                continue
            h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
            h.update(memoryview(t.contiguous().numpy()).cast("B"))
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()


def _missing(name: str, root: Path, download: bool, cause: Exception) -> DataError:
    tried = (
        f"and downloading it failed ({cause})"
        if download
        else "and data.download=false (set data.download=true on a machine with network access)"
    )
    return DataError(
        f"data set {name} not found in {root} {tried}. Fixes: point data.root at a folder that holds a copy "
        f"(data.root=/path/to/data), or use the offline built-in set: data=digits"
    )


def _torchvision(name: str, cls: Callable[..., object], root: Path, download: bool, split_arg: str) -> list[object]:
    sets = []
    for split in ("train", "test"):
        kwargs = {"split": split} if split_arg == "split" else {"train": split == "train"}
        try:
            sets.append(cls(str(root), download=download, **kwargs))
        except (RuntimeError, OSError) as exc:  # "Dataset not found", URLError, socket errors
            raise _missing(name, root, download, exc) from None
    return sets


def _hwc(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(data))
    return t.permute(0, 3, 1, 2).contiguous()


def _labels(values: object) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int64)


def cifar10(root: str | Path, download: bool = True) -> ImageSplits:
    tr, te = _torchvision("CIFAR-10", torchvision.datasets.CIFAR10, Path(root), download, "train")
    return ImageSplits(_hwc(tr.data), _labels(tr.targets), _hwc(te.data), _labels(te.targets), list(tr.classes))


def cifar100(root: str | Path, download: bool = True) -> ImageSplits:
    tr, te = _torchvision("CIFAR-100", torchvision.datasets.CIFAR100, Path(root), download, "train")
    return ImageSplits(_hwc(tr.data), _labels(tr.targets), _hwc(te.data), _labels(te.targets), list(tr.classes))


def _gray(name: str, cls: Callable[..., object], root: str | Path, download: bool) -> ImageSplits:
    tr, te = _torchvision(name, cls, Path(root), download, "train")
    return ImageSplits(
        tr.data.unsqueeze(1).contiguous(),
        _labels(tr.targets),
        te.data.unsqueeze(1).contiguous(),
        _labels(te.targets),
        list(tr.classes),
    )


def mnist(root: str | Path, download: bool = True) -> ImageSplits:
    return _gray("MNIST", torchvision.datasets.MNIST, root, download)


def fashion_mnist(root: str | Path, download: bool = True) -> ImageSplits:
    return _gray("Fashion-MNIST", torchvision.datasets.FashionMNIST, root, download)


def svhn(root: str | Path, download: bool = True) -> ImageSplits:
    tr, te = _torchvision("SVHN", torchvision.datasets.SVHN, Path(root), download, "split")
    classes = [str(i) for i in range(10)]
    return ImageSplits(
        torch.as_tensor(tr.data), _labels(tr.labels), torch.as_tensor(te.data), _labels(te.labels), classes
    )


def digits(root: str | Path | None = None, download: bool = False, test_fraction: float = 0.2) -> ImageSplits:
    """scikit-learn's handwritten digits (1,797 8x8 images), shipped inside the package: works offline.

    The set has no official test split, so a fixed 20% is held out as test.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(np.round(bunch.images * (255.0 / 16.0)), dtype=torch.uint8).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return ImageSplits(x[train], y[train], x[test], y[test], [str(i) for i in range(10)])
