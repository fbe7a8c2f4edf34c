"""Per-step cost of the framework: the pipeline vs a plain loop on a network too small to matter.

    python benchmarks/step_overhead.py            # CPU, or the GPU when there is one

The network (one block at 8 px) costs almost nothing, so the difference per step between the
pipeline (Lightning + TensorImageDataModule + schedule + epoch sums) and a plain PyTorch loop over
the same batches is the framework's own overhead, which decides how close a fast (CUDA-graph)
step can get to a hand-written loop. Times the pipeline eager and with ``train.cuda_graph``
(captured on a GPU; on a CPU the same static-buffer step runs eagerly). Writes
benchmarks/results/step_overhead-<device>.json and .md.
"""

from __future__ import annotations

import time

import torch
from bench_output import device_name, sync, write_results
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nas.cli import CONF_DIR, quiet_libraries
from nas.train.module import ClassifierModule, param_groups
from nas.train.run import load_training_data, make_datamodule, make_trainer

ARCH = "nas1-r8-w0.25-stem_c8_s2_re-k3_e1_c8_s2_re-head_c16_re-fc_c16"
EPOCHS = 3


def pipeline(cfg, dm, cuda_graph: bool) -> float:
    t = cfg.train
    module = ClassifierModule(
        ARCH, dm.num_classes, instantiate(t.optimizer), instantiate(t.schedule), cuda_graph=cuda_graph
    )
    trainer = make_trainer(cfg, limit_val_batches=0)
    sync()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    sync()
    return time.perf_counter() - t0


def plain(cfg, dm) -> float:
    model = ClassifierModule(ARCH, dm.num_classes, instantiate(cfg.train.optimizer)).model.to(dm.device).train()
    opt = torch.optim.SGD(param_groups(model, cfg.train.optimizer.weight_decay), lr=0.1, momentum=0.9, nesterov=True)
    criterion = torch.nn.CrossEntropyLoss()
    batches = dm.train_dataloader()
    sync()
    t0 = time.perf_counter()
    for _ in range(EPOCHS):
        for x, y in batches:
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    quiet_libraries()
    torch.set_num_threads(1)  # the overhead is single-threaded Python; keep the tiny kernels comparable
    overrides = [f"train.epochs={EPOCHS}", "data=digits", "data.repeat=8", "train.batch_size=16"]
    overrides += ["train.channels_last=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dm = make_datamodule(cfg, load_training_data(cfg), resolution=8)
    steps = EPOCHS * len(dm.train_dataloader())
    pipeline(cfg, dm, False), plain(cfg, dm)  # warm-up
    timed = {
        "plain loop": min(plain(cfg, dm) for _ in range(3)),
        "pipeline": min(pipeline(cfg, dm, False) for _ in range(3)),
        "pipeline, cuda_graph step": min(pipeline(cfg, dm, True) for _ in range(3)),
    }
    per_step = {name: 1e6 * s / steps for name, s in timed.items()}
    device = device_name()
    result = {"device": device, "torch": torch.__version__, "steps": steps, "us_per_step": per_step}
    base = per_step["plain loop"]
    rows = "".join(f"| {name} | {us:.0f} | {us - base:+.0f} |\n" for name, us in per_step.items())
    text = (
        f"# Framework overhead per training step on {device}\n\n"
        f"`python benchmarks/step_overhead.py` ({ARCH}, batch 16, {steps} steps, 1 thread, "
        f"torch {torch.__version__}; best of 3 after a warm-up)\n\n"
        f"| loop | us/step | vs plain |\n|---|---|---|\n{rows}"
    )
    write_results("step_overhead", result, text)


if __name__ == "__main__":
    main()
