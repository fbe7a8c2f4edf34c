"""One training run of one architecture: the path every trial, ``nas.train`` and retraining share."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nas.cli import CONF_DIR
from nas.data import TensorImageDataModule
from nas.data.datamodule import AUGMENTS
from nas.data.folders import usable_cpus
from nas.data.loading import ImageData, check_root, check_storage, load_data, memory_budget
from nas.data.sources import DataError
from nas.errors import NasError
from nas.space import Arch
from nas.train.graphed_step import GRAPH_OPTIMIZERS, ddp_refusal
from nas.train.module import ClassifierModule, NonFiniteLossError
from nas.train.progress import progress_bar


def resolve_accelerator(choice: str) -> str:
    """'auto' -> 'gpu' when CUDA is usable, else 'cpu'; asking for a GPU that is not there is an error."""
    if choice in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise NasError("train.accelerator=gpu but no CUDA device is available; use train.accelerator=cpu")
        return "gpu"
    if choice == "cpu":
        return "cpu"
    if choice == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    raise NasError(f"train.accelerator={choice!r} is not one of auto, cpu, gpu")


def use_channels_last(choice: bool | str, accelerator: str) -> bool:
    """'auto': channels_last on CPU (measured 1.5x faster for these nets), not on GPU (slower at 32 px)."""
    if choice == "auto":
        return resolve_accelerator(accelerator) == "cpu"
    return bool(choice)


def use_cuda_graph(train_cfg: DictConfig) -> bool:
    """A captured step needs a CUDA device, full precision and a fused optimizer; else it is an error."""
    if not train_cfg.get("cuda_graph", False):
        return False
    if str(train_cfg.precision) not in ("32-true", "32"):
        raise NasError(
            f"train.cuda_graph=true supports train.precision=32-true only, not {train_cfg.precision}; "
            "use train.precision=32-true with it, or set train.cuda_graph=false"
        )
    target = str(train_cfg.optimizer.get("_target_", ""))
    known = [f"{c.__module__.rsplit('.', 1)[0]}.{c.__name__}" for c in GRAPH_OPTIMIZERS]
    if target not in known:
        raise NasError(
            f"train.cuda_graph=true supports the optimizers {', '.join(known)}, not {target}; "
            "pick train/optimizer=sgd or adamw, or set train.cuda_graph=false"
        )
    if train_cfg.get("bn_momentum", 0.1) is None:
        raise NasError(
            "train.cuda_graph=true cannot capture BatchNorm's cumulative average (train.bn_momentum=null reads a "
            "step count on the host every step): set train.bn_momentum=0.1 (or another number), or "
            "train.cuda_graph=false"
        )
    schedule = train_cfg.get("schedule") or {}
    if schedule.get("cycle_momentum", False):
        raise NasError(
            "train.cuda_graph=true cannot follow a momentum that changes every step (a captured graph keeps the "
            f"value it was captured with; {schedule.get('_target_')} cycles it): set "
            "train.schedule.cycle_momentum=false, or train.cuda_graph=false"
        )
    processes = int(train_cfg.get("devices", 1)) * int(train_cfg.get("num_nodes", 1))
    if processes > 1 or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise NasError(ddp_refusal(processes))
    if resolve_accelerator(train_cfg.accelerator) != "gpu":
        raise NasError(
            "train.cuda_graph=true captures the training step as a CUDA graph and needs a CUDA device; "
            "set train.cuda_graph=false to train on the CPU"
        )
    return True


def check_train_cfg(cfg: DictConfig) -> None:
    """Settings that would fail every run, refused before any data is loaded or trial started."""
    if cfg.train.epochs <= 0:
        raise NasError(f"train.epochs must be positive, got {cfg.train.epochs}")
    resolve_accelerator(cfg.train.accelerator)
    use_cuda_graph(cfg.train)


def recipe(cfg: DictConfig) -> dict[str, str | None]:
    """The kind of training a trial gets (optimizer and schedule classes), kept with its study:
    accuracies trained with different recipes are not comparable, and a retrain must reuse it."""
    schedule = cfg.train.get("schedule")
    return {
        "optimizer": str(cfg.train.optimizer.get("_target_")),
        "schedule": str(schedule.get("_target_")) if schedule else None,
    }


def recipe_overrides(stored: dict[str, str | None]) -> str:
    """Command-line group choices (``train/optimizer=adamw``) that reproduce a stored recipe."""
    choices = []
    for group in ("optimizer", "schedule"):
        folder = Path(CONF_DIR) / "train" / group
        for path in sorted(folder.glob("*.yaml")):
            if str(yaml.safe_load(path.read_text()).get("_target_")) == stored.get(group):
                choices.append(f"train/{group}={path.stem}")
                break
    return " ".join(choices)


def apply_hparams(cfg: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with the sampled values written at their keys."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def check_data_cfg(data_cfg: DictConfig) -> None:
    """Data settings every run would fail on, refused before anything is decoded."""
    check_root(data_cfg)
    augment = data_cfg.get("augment", "auto")
    if augment not in AUGMENTS:
        raise DataError(f"data.augment={augment!r} is not one of {', '.join(AUGMENTS)}")
    check_storage(data_cfg)
    data_workers(data_cfg)


def load_training_data(cfg: DictConfig, processes: int = 1, per_device: int = 1) -> ImageData:
    """The configured data set (once per process; callers keep it), in memory or streamed as
    ``data.storage`` decides for ``processes`` copies on this host (``per_device`` on one GPU). Its class
    count is the one every consumer uses; a stated ``data.num_classes`` that disagrees stops here."""
    check_data_cfg(cfg.data)
    device = data_device(cfg)
    return load_data(cfg.data, memory_budget(cfg.data, None if device == "cpu" else device, processes, per_device))


def data_workers(data_cfg: DictConfig) -> int:
    """Decoding processes for a streamed split: ``auto`` = every core up to 8 (the training process
    itself mostly waits on the device)."""
    value = data_cfg.get("workers", "auto")
    if value == "auto":
        return min(8, usable_cpus())
    if isinstance(value, int) and value >= 0:
        return value
    raise DataError(f"data.workers={value!r} must be auto or a number of processes >= 0 (0: decode in the trainer)")


def process_rank(cfg: DictConfig) -> int:
    """This process's global rank under DDP, known before any trainer exists: ``torchrun`` and cluster
    schedulers set RANK (or SLURM_PROCID); Lightning's own launcher starts ranks > 0 again with the same
    command and LOCAL_RANK (NODE_RANK per machine). 0 when not distributed."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    node = int(os.environ.get("NODE_RANK", 0))
    return node * int(cfg.train.get("devices", 1)) + int(os.environ.get("LOCAL_RANK", 0))


def data_device(cfg: DictConfig) -> str:
    """Where batches are augmented: the training GPU (this process's own under DDP), else the CPU."""
    if resolve_accelerator(cfg.train.accelerator) != "gpu":
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if int(cfg.train.get("devices", 1)) > 1 else "cuda"


def make_datamodule(
    cfg: DictConfig, data: ImageData, resolution: int, train_on_val: bool = False
) -> TensorImageDataModule:
    dm = TensorImageDataModule(
        name=cfg.data.name,
        loader=lambda: data,
        resolution=resolution,
        batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.train.eval_batch_size,
        val_size=cfg.data.val_size,
        split_seed=cfg.data.split_seed,
        mean=cfg.data.mean,
        std=cfg.data.std,
        hflip=cfg.data.hflip,
        pad=cfg.data.pad,
        device=data_device(cfg),
        train_on_val=train_on_val,
        seed=cfg.seed,
        limit_train=cfg.train.limit_train_images,
        repeat=int(cfg.data.repeat),
        augment=str(cfg.data.get("augment", "auto")),
        resized_crop=OmegaConf.to_container(cfg.data.resized_crop) if cfg.data.get("resized_crop") else None,
        workers=data_workers(cfg.data),
    )
    dm.setup("fit")
    return dm


def make_module(cfg: DictConfig, arch: Arch, num_classes: int) -> ClassifierModule:
    t = cfg.train
    return ClassifierModule(
        arch,
        num_classes,
        optimizer=instantiate(t.optimizer),
        scheduler=instantiate(t.schedule) if t.get("schedule") else None,
        weight_decay=float(t.optimizer.get("weight_decay", 0.0)),
        label_smoothing=t.label_smoothing,
        dropout=t.dropout,
        bn_momentum=t.bn_momentum,
        channels_last=use_channels_last(t.channels_last, t.accelerator),
        cuda_graph=use_cuda_graph(t),
    )


def make_trainer(
    cfg: DictConfig, callbacks: Sequence[pl.Callback] = (), logger: Any = False, **overrides: Any
) -> pl.Trainer:
    t = cfg.train
    torch.backends.cudnn.benchmark = bool(t.cudnn_benchmark)
    kwargs: dict[str, Any] = {
        "accelerator": resolve_accelerator(t.accelerator),
        "devices": int(t.get("devices", 1)),
        "num_nodes": int(t.get("num_nodes", 1)),
        "strategy": t.get("strategy", "auto"),
        "max_epochs": t.epochs,
        "precision": t.precision,
        "logger": logger,
        "callbacks": list(callbacks),
        "enable_checkpointing": False,
        "enable_progress_bar": progress_bar(t.progress_bar),
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": bool(t.deterministic),
        "benchmark": bool(t.cudnn_benchmark),
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def divergence_error(exc: NonFiniteLossError, cfg: DictConfig, consequence: str = "") -> NasError:
    """A diverged run as one line with the fix; under DDP every rank raises the same one."""
    return NasError(
        f"{exc}{consequence}. Lower the learning rate (train.optimizer.lr={cfg.train.optimizer.lr:g} now) and run again"
    )


@dataclass
class TrainResult:
    val_acc: float
    val_loss: float
    epochs: int
    module: ClassifierModule

    @property
    def graph_fallback(self) -> str | None:
        """Why a ``train.cuda_graph=true`` run trained eagerly after all (its capture failed), else None."""
        return self.module.graph_fallback


def train_arch(
    cfg: DictConfig,
    arch: Arch,
    datamodule: TensorImageDataModule,
    callbacks: Sequence[pl.Callback] = (),
    logger: Any = False,
) -> TrainResult:
    """Train ``arch`` with the configured recipe and return its final validation metrics."""
    check_train_cfg(cfg)
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    module = make_module(cfg, arch, datamodule.num_classes)
    trainer = make_trainer(cfg, callbacks, logger)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        # On every way out of fit (Lightning skips on_train_end when it raises): free the captured
        # graph, and unhook the trainer from the data module, which the search keeps across trials
        # and which would otherwise keep this trial's network (and its GPU memory) alive.
        module.release_graph()
        datamodule.trainer = None
    metrics = trainer.callback_metrics
    return TrainResult(
        val_acc=float(metrics["val_acc"]),
        val_loss=float(metrics["val_loss"]),
        epochs=trainer.current_epoch,
        module=module,
    )
