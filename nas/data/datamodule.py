"""A LightningDataModule over decoded uint8 tensors: seeded validation split, on-device batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from nas.data.augment import SMALL_IMAGE_MAX, random_crop_flip, random_resized_crop, to_network_input
from nas.data.sources import DataError, ImageSplits

AUGMENTS = ("auto", "padcrop", "resizedcrop")  # data.augment


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor


class TensorBatches:
    """An epoch of batches drawn from in-memory tensors; a new seeded shuffle every epoch.

    Stands in for a DataLoader: images are already decoded, so per-sample
    Python work (and worker processes) would only slow a short trial down.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        prepare: Callable[[torch.Tensor, bool, torch.Generator | None], torch.Tensor],
        train: bool,
        seed: int,
        repeat: int = 1,
    ) -> None:
        self.split = split
        self.repeat = repeat
        self.batch_size = batch_size
        self.prepare = prepare
        self.train = train
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.split.y)
        return n * self.repeat // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.split.x, self.split.y
        gen = None
        if self.train:
            gen = torch.Generator(device=x.device).manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.cat([torch.randperm(len(y), device=x.device, generator=gen) for _ in range(self.repeat)])
            self.epoch += 1
        for i in range(len(self)):
            if self.train:
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                xb, yb = x[idx], y[idx]
            else:
                window = slice(i * self.batch_size, (i + 1) * self.batch_size)
                xb, yb = x[window], y[window]
            yield self.prepare(xb, self.train, gen), yb


class TensorImageDataModule(pl.LightningDataModule):
    """Train / validation (carved from train, seeded) / test splits of a small-image data set.

    The search sees only validation accuracy; the test split is for the final
    evaluation of a retrained model.
    """

    def __init__(
        self,
        name: str,
        loader: Callable[[], ImageSplits],
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
        self.classes: list[str] = []
        self.train_split: Split | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is not None:
            return
        splits = self.loader()
        self.classes = list(splits.classes)
        train_idx, val_idx = self.split_indices(len(splits.train_y), self.val_size, self.split_seed)
        if self.limit_train is not None:
            train_idx = train_idx[: self.limit_train]
        if self.train_on_val:
            train_idx = torch.cat([train_idx, val_idx])
        dev = self.device
        self.train_split = Split(splits.train_x[train_idx].to(dev), splits.train_y[train_idx].to(dev))
        self.val_split = Split(splits.train_x[val_idx].to(dev), splits.train_y[val_idx].to(dev))
        self.test_split = Split(splits.test_x.to(dev), splits.test_y.to(dev)) if splits.test_x is not None else None
        channels = splits.train_x.shape[1]
        mean, std = self.mean_cfg, self.std_cfg
        if mean is None or std is None:  # e.g. an ImageFolder: measure on the training split
            x = self.train_split.x
            sample = x[:: max(1, len(x) // 10_000)].float().div(255)  # strided: files come sorted by class
            mean = sample.mean(dim=(0, 2, 3)).tolist()
            std = sample.std(dim=(0, 2, 3)).tolist()
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"data.mean/data.std need {channels} values for {self.name}, got {len(mean)}/{len(std)}")
        self.mean = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=dev).view(1, -1, 1, 1)

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

    def train_dataloader(self) -> TensorBatches:
        assert self.train_split is not None
        if len(self.train_split.y) < self.batch_size:
            raise DataError(
                f"{self.name}: {len(self.train_split.y)} training images are fewer than one batch "
                f"(train.batch_size={self.batch_size}); lower train.batch_size"
            )
        return TensorBatches(self.train_split, self.batch_size, self._prepare, True, self.seed, self.repeat)

    def val_dataloader(self) -> TensorBatches:
        return TensorBatches(self.val_split, self.eval_batch_size, self._prepare, False, self.seed)

    def test_dataloader(self) -> TensorBatches:
        if self.test_split is None:
            raise DataError(f"{self.name} has no test split (for an image folder: add {{root}}/test/<class>/...)")
        return TensorBatches(self.test_split, self.eval_batch_size, self._prepare, False, self.seed)
