"""A LightningDataModule over decoded uint8 tensors or streamed files: seeded validation split, on-device
augmentation the same for both."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from nas.data.augment import SMALL_IMAGE_MAX, random_crop_flip, random_resized_crop, to_network_input
from nas.data.folders import FileImages, ImageFiles, parallel_loader, worker_errors
from nas.data.sources import DataError, ImageSplits

AUGMENTS = ("auto", "padcrop", "resizedcrop")  # data.augment
STATS_IMAGES = 2000  # training images the normalisation of a folder without data.mean/std is measured on


@dataclass(frozen=True)
class Split:
    """Labels, and the images either decoded (``x``, on the data device) or as files read per batch."""

    y: torch.Tensor
    x: torch.Tensor | None = None
    files: FileImages | None = None


@dataclass(frozen=True)
class Shard:
    """This process's share under distributed training: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1


Prepare = Callable[[torch.Tensor, bool, torch.Generator | None], torch.Tensor]


class Batches:
    """An epoch of batches of one split; a new seeded shuffle every epoch, the same on every process.

    Training batches are drawn from one permutation (made on the data device, so both storages and every
    DDP rank see the same order) and dealt out rank by rank; evaluation covers each image exactly once
    across ranks. Stands in for a DataLoader over decoded tensors: per-sample Python work would only slow
    a short trial down. Streamed files go through a DataLoader for the decoding only.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        prepare: Prepare,
        train: bool,
        seed: int,
        device: torch.device,
        repeat: int = 1,
        shard: Shard = Shard(),
        workers: int = 0,
    ) -> None:
        self.split = split
        self.repeat = repeat
        self.batch_size = batch_size
        self.prepare = prepare
        self.train = train
        self.seed = seed
        self.device = device
        self.shard = shard
        self.workers = workers
        self.epoch = 0

    def _indices(self) -> tuple[torch.Tensor, torch.Generator | None]:
        n, shard = len(self.split.y), self.shard
        if not self.train:
            return torch.arange(shard.rank, n, shard.world, device=self.device), None
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.cat([torch.randperm(n, device=self.device, generator=gen) for _ in range(self.repeat)])
        self.epoch += 1
        return order[shard.rank :: shard.world], gen

    def __len__(self) -> int:
        n = len(self.split.y)
        if self.train:
            return n * self.repeat // self.shard.world // self.batch_size
        return -(-len(range(self.shard.rank, n, self.shard.world)) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx, gen = self._indices()
        chunks = [idx[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]
        if self.split.x is not None:
            for c in chunks:
                yield self.prepare(self.split.x[c], self.train, gen), self.split.y[c]
            return
        order = idx.tolist()  # one copy from the device for the whole epoch, not one per batch
        bs = self.batch_size
        loader = DataLoader(
            self.split.files,
            batch_sampler=[order[i * bs : (i + 1) * bs] for i in range(len(chunks))],
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers > 0 else None,
            generator=torch.Generator().manual_seed(self.seed),  # not the global RNG that dropout draws from
        )
        batches = worker_errors(iter(loader))
        for k in range(len(chunks)):
            xb, yb = next(batches)
            if k == len(chunks) - 1:
                # Run the loader to its end now: that is when its workers exit. Lightning stops asking after
                # len() batches, and workers left to the garbage collector wait out a 5 s timeout each.
                for _ in batches:
                    pass
            xb = xb.to(self.device, non_blocking=True)
            yield self.prepare(xb, self.train, gen), yb.to(self.device, non_blocking=True)


def channel_stats(batches: Iterable[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and (sample) standard deviation of uint8 image batches, accumulated batch by batch in
    float64: a 224-px sample never exists as one float tensor (2,000 images would be 1.6 GB)."""
    total = squares = None
    count = 0
    for x in batches:
        v = x.double().div_(255)
        s, q = v.sum(dim=(0, 2, 3)), v.square().sum(dim=(0, 2, 3))
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += v.numel() // v.shape[1]
    assert total is not None and count > 1
    mean = total / count
    var = (squares - count * mean.square()) / (count - 1)
    return mean.tolist(), var.clamp_min(0).sqrt().tolist()


def balanced_subset(index: torch.Tensor, labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """``limit`` entries of ``index`` (whose labels are ``labels``) dealt class by class, seeded, so that every
    class is equally represented (one with fewer images gives all it has, the others share the rest). Files
    come sorted by class: the first ``limit`` would be the first classes only."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DataError(f"train.limit_train_images={limit!r} must be a whole number >= 1, or null for every image")
    if limit >= len(index):
        return index
    perm = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    by_class = torch.argsort(shuffled, stable=True)  # grouped by class, in random order within each
    grouped = shuffled[by_class]
    rank = torch.empty_like(by_class)
    rank[by_class] = torch.arange(len(by_class)) - torch.searchsorted(grouped, grouped)  # place within its class
    dealt = torch.argsort(rank * (int(labels.max()) + 1) + shuffled)  # the 1st of every class, then the 2nd, ...
    return index[perm[dealt[:limit]]].sort().values


class TensorImageDataModule(pl.LightningDataModule):
    """Train / validation (carved from train, seeded) / test splits of a small-image data set.

    The search sees only validation accuracy; the test split is for the final
    evaluation of a retrained model.
    """

    def __init__(
        self,
        name: str,
        loader: Callable[[], ImageSplits | ImageFiles],
        resolution: int,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hflip: bool = True,
        pad: int = 4,
        device: str = "cpu",
        train_on_val: bool = False,
        seed: int = 0,
        limit_train: int | None = None,
        repeat: int = 1,
        augment: str = "auto",
        resized_crop: dict | None = None,
        workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise DataError(f"train.batch_size must be positive, got {batch_size}")
        if augment not in AUGMENTS:
            raise DataError(f"data.augment={augment!r} is not one of {', '.join(AUGMENTS)}")
        crop = {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), **(resized_crop or {})}
        self.augment = augment
        self.crop_scale = (float(crop["scale"][0]), float(crop["scale"][1]))
        self.crop_ratio = (float(crop["ratio"][0]), float(crop["ratio"][1]))
        self.name = name
        self.loader = loader
        self.resolution = resolution
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.mean_cfg, self.std_cfg = mean, std
        self.hflip = hflip
        self.pad = pad
        self.device = torch.device(device)
        self.train_on_val = train_on_val
        self.seed = seed
        self.limit_train = limit_train
        self.repeat = repeat
        self.workers = workers  # decoding processes per streamed split (0: in this process)
        self.streamed = False
        self.classes: list[str] = []
        self.train_split: Split | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is not None:
            return
        data = self.loader()
        self.classes = list(data.classes)
        self.streamed = isinstance(data, ImageFiles)
        n = len(data.train.labels) if isinstance(data, ImageFiles) else len(data.train_y)
        train_idx, val_idx = self.split_indices(n, self.val_size, self.split_seed)
        if self.limit_train is not None:
            labels = data.train.labels if isinstance(data, ImageFiles) else data.train_y
            train_idx = balanced_subset(train_idx, labels[train_idx].cpu(), self.limit_train, self.split_seed)
        if self.train_on_val:
            train_idx = torch.cat([train_idx, val_idx])
        if isinstance(data, ImageFiles):
            self.train_split, self.val_split = self._files(data.train, train_idx), self._files(data.train, val_idx)
            self.test_split = self._files(data.test, None) if data.test is not None else None
        else:
            dev = self.device
            self.train_split = Split(data.train_y[train_idx].to(dev), data.train_x[train_idx].to(dev))
            self.val_split = Split(data.train_y[val_idx].to(dev), data.train_x[val_idx].to(dev))
            self.test_split = Split(data.test_y.to(dev), data.test_x.to(dev)) if data.test_x is not None else None
        self._set_normalisation(data.image_shape[0])

    def _files(self, files: FileImages, index: torch.Tensor | None) -> Split:
        chosen = files if index is None else files.subset(index)
        return Split(chosen.labels.to(self.device), files=chosen)

    def _set_normalisation(self, channels: int) -> None:
        mean, std = self.mean_cfg, self.std_cfg
        if mean is None or std is None:  # e.g. an image folder: measured on the training split
            mean, std = channel_stats(self.stats_sample())
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"data.mean/data.std need {channels} values for {self.name}, got {len(mean)}/{len(std)}")
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def stats_sample(self) -> Iterator[torch.Tensor]:
        """Batches of the training images normalisation is measured on: at most STATS_IMAGES, strided (files
        come sorted by class), the same images whichever the storage, so both normalise alike."""
        split = self.train_split
        assert split is not None
        n = len(split.y)
        index = torch.arange(0, n, max(1, -(-n // STATS_IMAGES)))
        if split.x is None:
            yield from (x for x, _ in parallel_loader(split.files.subset(index), workers=self.workers))
            return
        for chunk in index.to(split.x.device).split(64):
            yield split.x[chunk]

    @staticmethod
    def split_indices(n: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed validation split carved from the training set; same seed, same split."""
        n_val = round(n * val_size) if isinstance(val_size, float) and val_size < 1 else int(val_size)
        if not 0 < n_val < n:
            raise DataError(f"data.val_size={val_size} leaves no training or no validation images out of {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def resized_crops(self, image_side: int) -> bool:
        """Whether training batches get random-resized-crop (large images) rather than pad-crop (small ones)."""
        if self.augment == "auto":
            return image_side > SMALL_IMAGE_MAX
        return self.augment == "resizedcrop"

    def _prepare(self, x: torch.Tensor, train: bool, gen: torch.Generator | None) -> torch.Tensor:
        if train and self.resized_crops(x.shape[-1]):
            x = random_resized_crop(x, self.resolution, self.crop_scale, self.crop_ratio, gen)
            x = random_crop_flip(x, 0, self.hflip, gen)
        elif train:
            x = random_crop_flip(x, self.pad, self.hflip, gen)
        return to_network_input(x, self.mean, self.std, self.resolution)

    def shard(self) -> Shard:
        """This process's share when Lightning trains on several processes (DDP), else everything."""
        trainer = self.trainer
        return Shard(trainer.global_rank, trainer.world_size) if trainer is not None else Shard()

    def _batches(self, split: Split, batch_size: int, train: bool) -> Batches:
        return Batches(
            split,
            batch_size,
            self._prepare,
            train,
            self.seed,
            self.device,
            self.repeat if train else 1,
            self.shard(),
            self.workers if split.files is not None else 0,
        )

    def train_dataloader(self) -> Batches:
        assert self.train_split is not None
        if len(self.train_split.y) < self.batch_size * self.shard().world:
            raise DataError(
                f"{self.name}: {len(self.train_split.y)} training images are fewer than one batch per process "
                f"(train.batch_size={self.batch_size}); lower train.batch_size"
            )
        return self._batches(self.train_split, self.batch_size, True)

    def val_dataloader(self) -> Batches:
        return self._batches(self.val_split, self.eval_batch_size, False)

    def test_dataloader(self) -> Batches:
        if self.test_split is None:
            raise DataError(f"{self.name} has no test split (for an image folder: add {{root}}/test/<class>/...)")
        return self._batches(self.test_split, self.eval_batch_size, False)
