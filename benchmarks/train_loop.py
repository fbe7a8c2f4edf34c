"""One epoch through the pipeline (Lightning module + data module) vs a plain PyTorch loop, same model.

    python benchmarks/train_loop.py data=imagefolder data.root=/tmp/cifar10-sub            # GPU, CIFAR-10
    python benchmarks/train_loop.py data=digits train.limit_train_images=2000              # CPU smoke

Both use the same architecture (MobileNetV3-Small adapted to 32 px), batch size, optimizer
(SGD, Nesterov), channels-last choice and on-device augmentation; the plain loop is what a user
would write by hand. On a GPU the pipeline is timed twice: eager, and with ``train.cuda_graph=true``
(the whole step captured as one CUDA graph). Each is run once to warm up, then timed. Writes
benchmarks/results/train_loop-<device>.json and .md after each pipeline variant.
"""

from __future__ import annotations

import sys
import time

import torch
from bench_output import device_name, sync, write_results
from hydra import compose, initialize_config_dir

from nas.cli import CONF_DIR, quiet_libraries
from nas.data.augment import random_crop_flip, to_network_input
from nas.space import arch_from_text
from nas.train.module import param_groups
from nas.train.run import load_training_data, make_datamodule, make_module, make_trainer, use_channels_last


def pipeline_epoch(cfg, arch, dm) -> float:
    module = make_module(cfg, arch, dm.num_classes)
    trainer = make_trainer(cfg, max_epochs=1, limit_val_batches=0)
    sync()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    sync()
    return time.perf_counter() - t0


def plain_epoch(cfg, arch, dm) -> float:
    device = dm.train_split.x.device
    module = make_module(cfg, arch, dm.num_classes).to(device)
    model, criterion = module.model.train(), torch.nn.CrossEntropyLoss()
    fmt = torch.channels_last if use_channels_last(cfg.train.channels_last, cfg.train.accelerator) else None
    opt = torch.optim.SGD(
        param_groups(model, cfg.train.optimizer.weight_decay), lr=cfg.train.optimizer.lr, momentum=0.9, nesterov=True
    )
    x_all, y_all, bs = dm.train_split.x, dm.train_split.y, dm.batch_size
    sync()
    t0 = time.perf_counter()
    steps = len(dm.train_dataloader())  # the same number of batches as the pipeline (data.repeat included)
    order = torch.cat([torch.randperm(len(y_all), device=device) for _ in range(dm.repeat)])
    for i in range(steps):
        idx = order[i * bs : (i + 1) * bs]
        x = to_network_input(random_crop_flip(x_all[idx], dm.pad, dm.hflip), dm.mean, dm.std, dm.resolution)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        loss = criterion(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return time.perf_counter() - t0


def main(overrides: list[str]) -> None:
    quiet_libraries()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["train.epochs=1", *overrides])
        graph_cfg = None  # on a GPU the pipeline is also timed with its captured training step
        if torch.cuda.is_available():
            graph_cfg = compose(config_name="config", overrides=["train.epochs=1", *overrides, "train.cuda_graph=true"])
    splits = load_training_data(cfg)
    arch = arch_from_text("reference:mobilenet_v3_small", int(splits.train_x.shape[-1]))
    dm = make_datamodule(cfg, splits, arch.resolution)
    images = len(dm.train_dataloader()) * dm.batch_size
    pipelines = {"pipeline (Lightning + TensorImageDataModule)": cfg}
    if graph_cfg is not None:
        pipelines["pipeline, train.cuda_graph=true"] = graph_cfg
    plain_epoch(cfg, arch, dm)  # warm-up (allocator, kernels)
    plain = min(plain_epoch(cfg, arch, dm) for _ in range(2))
    timed: dict[str, float] = {}
    for name, variant in pipelines.items():  # the figures are written after each, so a cut run keeps the first
        pipeline_epoch(variant, arch, dm)  # warm-up
        timed[name] = min(pipeline_epoch(variant, arch, dm) for _ in range(2))
        report(overrides, arch.resolution, images, dm.batch_size, plain, timed)


def report(overrides: list[str], resolution: int, images: int, batch: int, plain: float, timed: dict) -> None:
    device = device_name()
    result = {
        "device": device,
        "torch": torch.__version__,
        "overrides": overrides,
        "images": images,
        "batch_size": batch,
        "plain_s": plain,
        "plain_images_per_s": images / plain,
        "pipelines": {
            name: {"s": t, "images_per_s": images / t, "ratio_to_plain": t / plain} for name, t in timed.items()
        },
    }
    rows = "".join(f"| {name} | {t:.2f} | {images / t:.0f} | {t / plain:.3f} |\n" for name, t in timed.items())
    text = (
        f"# One training epoch on {device}: pipeline vs plain PyTorch loop\n\n"
        f"`python benchmarks/train_loop.py {' '.join(overrides)}` (MobileNetV3-Small at {resolution} px, "
        f"{images} images, batch {batch}, torch {torch.__version__}; best of 2 after a warm-up)\n\n"
        f"| loop | seconds | images/s | ratio to plain |\n|---|---|---|---|\n"
        f"{rows}| plain PyTorch loop (eager) | {plain:.2f} | {images / plain:.0f} | 1 |\n"
    )
    write_results("train_loop", result, text)


if __name__ == "__main__":
    main(sys.argv[1:])
