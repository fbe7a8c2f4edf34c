"""Image folders (``root/train/<class>/*``, ``root/test|val/<class>/*`` or ``root/<class>/*``), held whole
in memory or read file by file while training.

Both ways go through the same per-file decode (:func:`decode_file`) and the
same fingerprint, so a folder gives the same pixels, classes, labels and study
identity whichever storage a process picks. Decoding and hashing run in
DataLoader worker processes over every core.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from nas.data.sources import DataError, ImageSplits
from nas.image_resize import decode_stored

T = TypeVar("T")
FINGERPRINT_VERSION = "v2"
PARALLEL_FROM = 512  # files; fewer decode in the calling process (starting workers would cost more)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def decode_file(path: str, size: int | None) -> torch.Tensor:
    """One file as RGB uint8 (3, H, W) at ``size`` x ``size`` when set (:func:`nas.image_resize.decode_stored`,
    which ``nas.load`` uses too). PIL reads every format ImageFolder lists. A file that cannot be decoded stops
    with its path."""
    try:
        with Image.open(path) as pil:
            return decode_stored(pil, size)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(
            f"cannot decode {path}: {_first_line(exc)}. Replace or remove the file (a truncated copy?) and run again"
        ) from None


def header_size(path: str) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as pil:
            w, h = pil.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read {path}: {_first_line(exc)}. Replace or remove the file and run again") from None
    return h, w


class FileImages(Dataset):
    """Files as a map-style dataset: item ``i`` is (uint8 image, label), or with ``digests`` the image's
    file digest too (what a fingerprint or the memory decode needs). ``decode=False`` only hashes."""

    def __init__(
        self, paths: Sequence[str], labels: torch.Tensor, size: int | None, digests: bool = False, decode: bool = True
    ) -> None:
        self.paths = list(paths)
        self.labels = labels
        self.size = size
        self.digests = digests
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: torch.Tensor) -> FileImages:
        return FileImages([self.paths[i] for i in index.tolist()], self.labels[index], self.size)

    def __getitem__(self, i: int) -> tuple:
        path = self.paths[i]
        if not self.decode:
            hw = header_size(path) if self.size is None else (self.size, self.size)  # resized anyway
            return _digest(path), torch.tensor(hw)
        img = decode_file(path, self.size)
        return (img, self.labels[i], _digest(path)) if self.digests else (img, self.labels[i])


def _digest(path: str) -> torch.Tensor:
    digest = hashlib.blake2b(Path(path).read_bytes(), digest_size=16).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8)


def worker_errors(batches: Iterable[T]) -> Iterator[T]:
    """A DataError raised in a DataLoader worker arrives wrapped in its traceback: pass on its own message."""
    it = iter(batches)
    try:
        yield from it
    except DataError as exc:
        # Stop the other workers now: left to the garbage collector they would each wait out a timeout.
        getattr(it, "_shutdown_workers", lambda: None)()
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise DataError(last.split("DataError: ", 1)[-1]) from None


def parallel_loader(dataset: Dataset, batch_size: int = 64, workers: int | None = None) -> Iterator:
    """The dataset's batches in order, over every core when it is large enough to pay for starting workers."""
    n = (usable_cpus() if workers is None else workers) if len(dataset) >= PARALLEL_FROM else 0
    return worker_errors(DataLoader(dataset, batch_size=batch_size, num_workers=n))


@dataclass(frozen=True)
class FolderSplit:
    """One split's files and labels, in ImageFolder's sorted order (the order every split seed refers to)."""

    folder: ImageFolder
    paths: list[str]
    labels: torch.Tensor

    @classmethod
    def scan(cls, path: Path) -> FolderSplit:
        try:
            folder = ImageFolder(str(path), loader=lambda p: p)  # the loader is never called here
        except (FileNotFoundError, OSError) as exc:
            raise DataError(
                f"image folder {path} has no class sub-folders with images ({exc}); expected {path}/<class>/<image>"
            ) from None
        return cls(folder, [p for p, _ in folder.samples], torch.tensor(folder.targets, dtype=torch.int64))

    def stat_key(self, size: int | None) -> str:
        """Relative paths, labels, sizes and mtimes of every file, and the decode size: the cache's key, cheap
        (no file is read) and different when any file is edited, added or removed."""
        h = hashlib.sha256(f"{FINGERPRINT_VERSION}|{size}".encode())
        base = Path(self.folder.root)
        for path, label in zip(self.paths, self.labels.tolist(), strict=True):
            st = os.stat(path)
            h.update(f"{Path(path).relative_to(base)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:20]

    def content_digest(self, size: int | None, file_digests: torch.Tensor) -> str:
        """What the split *is*: relative paths, labels and file bytes (as per-file digests), the same for a
        copy on another machine, where mtimes and even JPEG decoders may differ."""
        h = hashlib.blake2b(f"{FINGERPRINT_VERSION}|{size}".encode(), digest_size=16)
        base = Path(self.folder.root)
        for path, label, d in zip(self.paths, self.labels.tolist(), file_digests, strict=True):
            h.update(f"{Path(path).relative_to(base)}|{label}|".encode())
            h.update(bytes(d.tolist()))
        return h.hexdigest()


def _same_size_or_stop(root: str, sizes: set[tuple[int, ...]]) -> None:
    if len(sizes) > 1:
        raise DataError(
            f"images in {root} have different sizes ({', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:3])}...); "
            "set data.image_size=N to resize them to NxN when decoding"
        )


def _decode_split(split: FolderSplit, size: int | None) -> tuple[torch.Tensor, str]:
    """Every image into one preallocated tensor (no list to stack: the peak is the set, not twice it)."""
    n = len(split.paths)
    if size is None:
        h, w = header_size(split.paths[0])
    else:
        h = w = size
    x = torch.empty((n, 3, h, w), dtype=torch.uint8)
    digests = torch.empty((n, 16), dtype=torch.uint8)
    at = 0
    for imgs, _, d in parallel_loader(FileImages(split.paths, split.labels, size, digests=True), _batch_for(h, w)):
        _same_size_or_stop(split.folder.root, {(h, w), tuple(imgs.shape[-2:])})
        x[at : at + len(imgs)] = imgs
        digests[at : at + len(imgs)] = d
        at += len(imgs)
    return x, split.content_digest(size, digests)


def _batch_for(h: int, w: int) -> int:
    return max(1, min(256, (8 << 20) // (3 * h * w)))  # about 8 MB per batch through the workers' queue


def _hash_split(split: FolderSplit, size: int | None) -> tuple[str, tuple[int, int]]:
    """The split's content digest and its images' size, reading every file once but decoding none."""
    digests, sizes = [], set()
    for d, hw in parallel_loader(FileImages(split.paths, split.labels, size, decode=False), 256):
        digests.append(d)
        sizes.update(tuple(s) for s in hw.tolist())
    if size is None:
        _same_size_or_stop(split.folder.root, sizes)
    shape = (size, size) if size is not None else next(iter(sizes))
    return split.content_digest(size, torch.cat(digests)), shape


@dataclass(frozen=True)
class ImageFiles:
    """An image folder read file by file while training: what ``data.storage=stream`` trains from.

    Same classes, labels, order and fingerprint as the decoded :class:`ImageSplits` of the same folder.
    """

    train: FileImages
    test: FileImages | None
    classes: list[str]
    image_shape: tuple[int, int, int]
    source_fingerprint: str

    @property
    def has_test(self) -> bool:
        return self.test is not None

    def fingerprint(self) -> str:
        return self.source_fingerprint


class ImageFolderSource:
    """A user's image folder, decoded whole (``load``) or indexed for streaming (``files``).

    Decoded sets are cached as one uint8 tensor file under ``cache_dir`` (memory-mapped when read again, so
    only the pages a process touches are resident); streamed ones cache only their fingerprint.
    """

    def __init__(
        self, root: str | Path, image_size: int | None = None, cache_dir: str | Path = "outputs/cache"
    ) -> None:
        self.root = Path(root)
        self.image_size = None if image_size is None else int(image_size)
        self.cache_dir = Path(cache_dir)

    def __call__(self) -> ImageSplits:
        return self.load()

    @cached_property
    def _scanned(self) -> tuple[FolderSplit, FolderSplit | None]:
        return self.splits()

    def splits(self) -> tuple[FolderSplit, FolderSplit | None]:
        """The training split and the held-out one (``test/``, else ImageNet's ``val/``), scanned, not read."""
        root = self.root
        if not root.is_dir():
            raise DataError(
                f"image folder {root} does not exist. Fixes: point data.root at a folder with train/<class>/ images "
                f"(or <class>/ sub-folders), or use the offline built-in set: data=digits"
            )
        train_dir = root / "train" if (root / "train").is_dir() else root
        train = FolderSplit.scan(train_dir)
        held = next((root / d for d in ("test", "val") if (root / d).is_dir()), None) if train_dir != root else None
        test = FolderSplit.scan(held) if held is not None else None
        if test is not None and test.folder.classes != train.folder.classes:
            raise DataError(f"{held} has classes {test.folder.classes}, but {train_dir} has {train.folder.classes}")
        return train, test

    def decoded_bytes(self) -> int:
        """The decoded set's size, from the file count and one header: what ``storage=auto`` weighs."""
        train, test = self._scanned  # scanned once: storage=auto weighs, then loads (a million files)
        h, w = (self.image_size,) * 2 if self.image_size is not None else header_size(train.paths[0])
        n = len(train.paths) + (len(test.paths) if test is not None else 0)
        return n * 3 * h * w

    def load(self) -> ImageSplits:
        train, test = self._scanned
        tx, ty, train_digest = self._cached_decode(train)
        test_x = test_y = None
        digests = [train_digest]
        if test is not None:
            test_x, test_y, test_digest = self._cached_decode(test)
            digests.append(test_digest)
        return ImageSplits(tx, ty, test_x, test_y, list(train.folder.classes), source_fingerprint=_combine(digests))

    def files(self) -> ImageFiles:
        train, test = self._scanned
        train_digest, (h, w) = self._cached_hash(train)
        digests = [train_digest]
        if test is not None:
            test_digest, test_hw = self._cached_hash(test)
            if self.image_size is None:
                _same_size_or_stop(str(self.root), {(h, w), test_hw})
            digests.append(test_digest)
        size = self.image_size
        return ImageFiles(
            FileImages(train.paths, train.labels, size),
            FileImages(test.paths, test.labels, size) if test is not None else None,
            list(train.folder.classes),
            (3, h, w),
            _combine(digests),
        )

    def _cached_decode(self, split: FolderSplit) -> tuple[torch.Tensor, torch.Tensor, str]:
        cache = self.cache_dir / f"imagefolder-{split.stat_key(self.image_size)}.pt"
        if cache.is_file():
            blob = torch.load(cache, weights_only=True, mmap=True)
            return blob["x"], blob["y"], blob["digest"]
        x, digest = _decode_split(split, self.image_size)
        _write_atomically(cache, lambda tmp: torch.save({"x": x, "y": split.labels, "digest": digest}, tmp))
        return x, split.labels, digest

    def _cached_hash(self, split: FolderSplit) -> tuple[str, tuple[int, int]]:
        cache = self.cache_dir / f"imagefolder-{split.stat_key(self.image_size)}.json"
        if cache.is_file():
            blob = json.loads(cache.read_text())
            return blob["digest"], tuple(blob["image_size"])
        digest, hw = _hash_split(split, self.image_size)
        _write_atomically(cache, lambda tmp: tmp.write_text(json.dumps({"digest": digest, "image_size": list(hw)})))
        return digest, hw


def _combine(digests: list[str]) -> str:
    return hashlib.blake2b("|".join(digests).encode(), digest_size=16).hexdigest()


def _write_atomically(path: Path, write) -> None:
    """A concurrent or interrupted run never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    write(tmp)
    tmp.replace(path)


def imagefolder(
    root: str | Path, download: bool = False, image_size: int | None = None, cache_dir: str | Path = "outputs/cache"
) -> ImageSplits:
    """The folder decoded whole (``data.storage=memory``)."""
    return ImageFolderSource(root, image_size, cache_dir).load()


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
