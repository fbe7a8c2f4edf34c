"""Which storage a data set gets (decoded in memory, or streamed from its files), and its class count.

``data.storage=auto`` keeps a set in memory when every copy the run will hold
fits in a fraction (``data.memory_fraction``) of the memory available now, on
the host and on the training GPU; otherwise it streams. Only image folders can
stream: the built-in sets come from torchvision as arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nas.data.folders import ImageFiles, folder_classes
from nas.data.sources import DataError, ImageSplits

STORAGES = ("auto", "memory", "stream")
ImageData = ImageSplits | ImageFiles


@dataclass(frozen=True)
class MemoryBudget:
    """What ``storage=auto`` weighs a decoded set against."""

    host_bytes: int
    device_bytes: int | None  # free memory of the training GPU; None: asked of ``device`` when needed
    fraction: float
    processes: int = 1  # processes on this host that each hold a copy (search workers, DDP ranks)
    per_device: int = 1  # of them on one GPU (search.trials_per_gpu)
    device: str | None = None  # the training GPU ("cuda", "cuda:N"); None when training on the CPU

    def gpu_free(self) -> int | None:
        """Asked only when a choice is made: querying creates a CUDA context on that device."""
        if self.device_bytes is not None or self.device is None:
            return self.device_bytes
        return int(torch.cuda.mem_get_info(torch.device(self.device))[0])

    def choose(self, decoded: int) -> tuple[str, str]:
        """(storage, why) for a set of ``decoded`` bytes."""
        need_host = decoded * self.processes
        allow_host = self.fraction * self.host_bytes
        copies = f" x {self.processes} processes" if self.processes > 1 else ""
        why = f"{_gb(decoded)} decoded{copies}"
        if need_host > allow_host:
            return "stream", f"{why} > {self.fraction:.0%} of {_gb(self.host_bytes)} host memory available"
        gpu = self.gpu_free()
        if gpu is not None and decoded * self.per_device > self.fraction * gpu:
            return "stream", f"{why} > {self.fraction:.0%} of {_gb(gpu)} free on the GPU"
        return "memory", f"{why} <= {self.fraction:.0%} of {_gb(self.host_bytes)} host memory available"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def available_host_bytes() -> int:
    """MemAvailable (what can be allocated without swapping), else the physical total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(data_cfg: Any, gpu: str | None, processes: int = 1, per_device: int = 1) -> MemoryBudget:
    """``gpu``: the training device ("cuda", "cuda:N"), or None on the CPU."""
    limit = data_cfg.get("memory_limit_gb")
    host = int(float(limit) * 1e9) if limit is not None else available_host_bytes()
    fraction = float(data_cfg.get("memory_fraction", 0.5))
    return MemoryBudget(host, None, fraction, processes, per_device, gpu)


def check_root(data_cfg: Any) -> None:
    """A data set that must be told where it is (an image folder) says so, instead of a traceback from the
    first place that reads the missing value."""
    if OmegaConf.is_missing(data_cfg, "root"):
        raise DataError(
            f"data={data_cfg.name} needs the folder of images: add data.root=DIR (DIR/train/<class>/*.jpg with "
            "DIR/test/<class>/*.jpg, or DIR/<class>/*.jpg)"
        )


def check_storage(data_cfg: Any) -> str:
    storage = str(data_cfg.get("storage", "auto"))
    if storage not in STORAGES:
        raise DataError(f"data.storage={storage!r} is not one of {', '.join(STORAGES)}")
    fraction, limit = data_cfg.get("memory_fraction", 0.5), data_cfg.get("memory_limit_gb")
    if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise DataError(f"data.memory_fraction={fraction!r} must be a fraction in (0, 1], e.g. 0.5")
    if limit is not None and (not isinstance(limit, int | float) or isinstance(limit, bool) or limit <= 0):
        raise DataError(f"data.memory_limit_gb={limit!r} must be a positive number of GB, or null for the free memory")
    return storage


def load_data(data_cfg: Any, budget: MemoryBudget) -> ImageData:
    """The configured data set, decoded or indexed for streaming as ``data.storage`` says; a folder's
    choice is printed with its reason. Its class count is the one every consumer uses."""
    storage = check_storage(data_cfg)
    source = instantiate(data_cfg.loader)
    if not hasattr(source, "files"):  # a built-in set: arrays from torchvision
        if storage == "stream":
            raise DataError(
                f"data.storage=stream reads image files while training, and data={data_cfg.name} is loaded whole "
                "by torchvision: use data.storage=memory (or auto), or data=imagefolder for a folder of images"
            )
        data: ImageData = source()
    else:
        why = "data.storage=" + storage
        if storage == "auto":
            storage, why = budget.choose(source.decoded_bytes())
        print(f"data {data_cfg.name}: {storage} ({why})", flush=True)
        data = source.load() if storage == "memory" else source.files()
    check_class_count(data_cfg, data)
    return data


def class_count(data_cfg: Any) -> int:
    """How many classes the configured data has, for what needs it before (or without) loading the images,
    such as a latency table's classifier entries: ``data.num_classes``, else the folder's own classes."""
    check_root(data_cfg)
    stated = data_cfg.get("num_classes")
    if stated is not None:
        return int(stated)
    if data_cfg.get("root") is not None:
        return len(folder_classes(data_cfg.root))
    raise DataError(f"data={data_cfg.name} states no data.num_classes and has no data.root to count classes in")


def check_class_count(data_cfg: Any, data: ImageData) -> None:
    """A stated ``data.num_classes`` must be what the data holds: a classifier of the wrong width trains
    silently (labels beyond it fail late; fewer leave dead outputs), and latency tables key on it."""
    stated = data_cfg.get("num_classes")
    classes = data.classes
    if stated is not None and int(stated) != len(classes):
        raise DataError(
            f"data.num_classes={stated} but data={data_cfg.name}"
            f"{f' at {data_cfg.root}' if data_cfg.get('root') else ''} has {len(classes)} classes "
            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): set "
            f"data.num_classes={len(classes)}, or null to take the data's own count"
        )
