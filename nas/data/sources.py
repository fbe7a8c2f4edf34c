"""Data sets as decoded uint8 tensors, read through torchvision's own dataset classes.

Each loader returns :class:`ImageSplits`; the data module carves the
validation split and does the augmentation. A data set that is missing and
cannot be downloaded raises :class:`DataError` naming the set, the root and
the fixes, instead of torchvision's bare "Dataset not found".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms.v2 import functional as TF

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


def _fingerprint(folder: ImageFolder, size: int | None) -> str:
    """The decode cache's key: relative paths, labels, sizes and mtimes of every file, plus the decode size.
    Cheap (no file is read) and changes when any file is edited, added or removed."""
    h = hashlib.sha256(f"v1|{size}".encode())
    base = Path(folder.root)
    for path, label in folder.samples:
        st = os.stat(path)
        h.update(f"{Path(path).relative_to(base)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _open_image(folder: ImageFolder, path: str) -> Image.Image:
    """The image as RGB; a file PIL cannot decode (truncated, not an image) stops with its path."""
    try:
        return folder.loader(path).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(
            f"cannot decode {path}: {str(exc).splitlines()[0][:200]}. Replace or remove the file (a truncated "
            f"copy?) and run again"
        ) from None


def _decode_folder(folder: ImageFolder, size: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The images, their labels, and a digest of the files' bytes, paths and labels: what the data *is*,
    the same for a copy on another machine (where mtimes and even JPEG decoders may differ)."""
    images = []
    digest = hashlib.blake2b(f"v1|{size}".encode(), digest_size=16)
    base = Path(folder.root)
    for path, label in folder.samples:
        digest.update(f"{Path(path).relative_to(base)}|{label}|".encode())
        digest.update(Path(path).read_bytes())
        img = TF.pil_to_tensor(_open_image(folder, path))
        if size is not None and tuple(img.shape[1:]) != (size, size):
            img = TF.resize(img, [size, size], antialias=True)
        images.append(img)
    if len({tuple(i.shape) for i in images}) > 1:
        raise DataError(
            f"images in {folder.root} have different sizes; set data.image_size=N to resize them to NxN when decoding"
        )
    return torch.stack(images), torch.tensor(folder.targets, dtype=torch.int64), digest.hexdigest()


def _cached_folder(
    path: Path, size: int | None, cache_dir: Path
) -> tuple[ImageFolder, torch.Tensor, torch.Tensor, str]:
    try:
        folder = ImageFolder(str(path))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"image folder {path} has no class sub-folders with images ({exc}); expected {path}/<class>/<image>"
        ) from None
    cache = cache_dir / f"imagefolder-{_fingerprint(folder, size)}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        if "digest" in blob:  # caches written before the digest existed are decoded again
            return folder, blob["x"], blob["y"], blob["digest"]
    x, y, digest = _decode_folder(folder, size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"x": x, "y": y, "digest": digest}, tmp)
    tmp.replace(cache)  # atomic: a concurrent or interrupted run never sees half a file
    return folder, x, y, digest


def imagefolder(
    root: str | Path, download: bool = False, image_size: int | None = None, cache_dir: str | Path = "outputs/cache"
) -> ImageSplits:
    """``root/train/<class>/*`` (+ ``root/test/<class>/*``, or ImageNet's ``root/val/<class>/*``, as the
    held-out test split when present), or ``root/<class>/*``.

    Images are decoded once and cached as a uint8 tensor file keyed by the
    folder's file list, sizes and mtimes, so later runs load in a second.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist. Fixes: point data.root at a folder with train/<class>/ images "
            f"(or <class>/ sub-folders), or use the offline built-in set: data=digits"
        )
    train_dir = root / "train" if (root / "train").is_dir() else root
    folder, tx, ty, train_digest = _cached_folder(train_dir, image_size, Path(cache_dir))
    test_x = test_y = None
    digests = [train_digest]
    held_out = next((root / d for d in ("test", "val") if (root / d).is_dir()), None) if train_dir != root else None
    if held_out is not None:
        test_folder, test_x, test_y, test_digest = _cached_folder(held_out, image_size, Path(cache_dir))
        if test_folder.classes != folder.classes:
            raise DataError(f"{held_out} has classes {test_folder.classes}, but {train_dir} has {folder.classes}")
        digests.append(test_digest)
    digest = hashlib.blake2b("|".join(digests).encode(), digest_size=16).hexdigest()
    return ImageSplits(tx, ty, test_x, test_y, list(folder.classes), source_fingerprint=digest)


def folder_classes(root: str | Path) -> list[str]:
    """The classes of an image folder (``root/train/<class>/`` or ``root/<class>/``), without decoding it."""
    root = Path(root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    try:
        return find_classes(str(train_dir))[0]
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"image folder {train_dir} has no class sub-folders ({exc}); expected {train_dir}/<class>/<image>"
        ) from None


def class_count(data_cfg: Any) -> int:
    """How many classes the configured data has, for what needs it before (or without) loading the images,
    such as a latency table's classifier entries: ``data.num_classes``, else the folder's own classes."""
    stated = data_cfg.get("num_classes")
    if stated is not None:
        return int(stated)
    if data_cfg.get("root") is not None:
        return len(folder_classes(data_cfg.root))
    raise DataError(f"data={data_cfg.name} states no data.num_classes and has no data.root to count classes in")


def check_class_count(data_cfg: Any, splits: ImageSplits) -> None:
    """A stated ``data.num_classes`` must be what the data holds: a classifier of the wrong width trains
    silently (labels beyond it fail late; fewer leave dead outputs), and latency tables key on it."""
    stated = data_cfg.get("num_classes")
    if stated is not None and int(stated) != len(splits.classes):
        raise DataError(
            f"data.num_classes={stated} but data={data_cfg.name}"
            f"{f' at {data_cfg.root}' if data_cfg.get('root') else ''} has {len(splits.classes)} classes "
            f"({', '.join(splits.classes[:5])}{', ...' if len(splits.classes) > 5 else ''}): set "
            f"data.num_classes={len(splits.classes)}, or null to take the data's own count"
        )
