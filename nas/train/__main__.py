"""``python -m nas.train arch=<string|reference:NAME>``: train one architecture, print validation accuracy."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nas.cli import CONF_DIR, launch, quiet_libraries, user_errors
from nas.errors import NasError
from nas.models import cost
from nas.space import arch_from_text
from nas.train.module import NonFiniteLossError
from nas.train.progress import EpochLines, progress_bar
from nas.train.run import check_train_cfg, divergence_error, load_training_data, make_datamodule, train_arch


@user_errors
def main(cfg: DictConfig) -> float:
    quiet_libraries()
    if not cfg.arch:
        raise NasError("give the architecture to train: arch='<encoded string>' or arch=reference:mobilenet_v3_small")
    check_train_cfg(cfg)
    splits = load_training_data(cfg)
    arch = arch_from_text(cfg.arch, splits.image_shape[-1])
    dm = make_datamodule(cfg, splits, arch.resolution)
    c = cost(arch, dm.num_classes)
    print(f"training {arch.encode()}")
    print(
        f"  {c.params / 1e6:.2f} M params, {c.mflops:.1f} MFLOPs at {arch.resolution}px; data {cfg.data.name}: "
        f"{len(dm.train_split.y)} train / {len(dm.val_split.y)} val images; {cfg.train.epochs} epochs",
        flush=True,
    )
    lines = [] if progress_bar(cfg.train.progress_bar) else [EpochLines("  ")]
    try:
        result = train_arch(cfg, arch, dm, callbacks=lines)
    except NonFiniteLossError as exc:
        raise divergence_error(exc, cfg) from None
    print(f"val_acc={result.val_acc:.4f} val_loss={result.val_loss:.4f} after {result.epochs} epochs")
    return result.val_acc


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float:
    return main(cfg)


if __name__ == "__main__":
    launch(app, "config")
