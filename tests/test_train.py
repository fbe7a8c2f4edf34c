"""The training path: Hydra composition, the LightningModule, optimisers and schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from nas.space import decode
from nas.train.module import ClassifierModule, NonFiniteLossError, param_groups
from nas.train.run import load_training_data, make_datamodule, make_module, make_trainer, train_arch
from nas.train.schedules import cosine, one_cycle
from tests.conftest import TINY_ARCH, compose_cfg


def test_config_groups_compose_and_override():
    cfg = compose_cfg()
    assert cfg.data.name == "cifar10" and cfg.train.optimizer._target_ == "torch.optim.SGD"
    assert cfg.trials == 20 and "space" not in cfg
    cfg = compose_cfg(
        "data=fashion_mnist",
        "train.epochs=3",
        "train/optimizer=adamw",
        "train/schedule=onecycle",
        "+space=mbv3",
        "trials=7",
        "latency.budget_ms=1.5",
        "search.objective=pareto",
        "search/sampler=nsga2",
    )
    assert cfg.data.name == "fashion_mnist" and cfg.data.hflip is True and cfg.data.mean == [0.2860]
    assert cfg.data.loader._target_ == "nas.data.sources.fashion_mnist"
    assert cfg.train.epochs == 3 and cfg.train.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.train.schedule._target_ == "nas.train.schedules.one_cycle"
    assert cfg.space == "mbv3" and cfg.trials == 7 and cfg.latency.budget_ms == 1.5
    assert cfg.search.objective == "pareto" and cfg.search.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert compose_cfg("data=cifar100").data.loader.root == "data"
    assert compose_cfg("data=imagefolder", "data.root=/x").data.loader.root == "/x"


def _module(**kw):
    cfg = compose_cfg("train.optimizer.weight_decay=0.01")
    return make_module(cfg, decode(TINY_ARCH), 10) if not kw else ClassifierModule(TINY_ARCH, 10, **kw)


def test_weight_decay_skips_batchnorm_and_bias():
    module = _module()
    decay, no_decay = param_groups(module.model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    bn_weights = {id(m.weight) for m in module.model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn_weights <= {id(p) for p in no_decay["params"]}


def test_steps_change_weights_and_lower_loss_on_fixed_batch():
    torch.manual_seed(0)
    cfg = compose_cfg(
        "train.label_smoothing=0.1", "train/optimizer=adamw", "train.optimizer.lr=0.01", "train.dropout=0"
    )
    module = make_module(cfg, decode(TINY_ARCH), 10)
    optimizer = instantiate(cfg.train.optimizer)(param_groups(module.model, 0.0))
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    before = [p.detach().clone() for p in module.parameters()]
    module.train()
    losses = []
    for _ in range(30):
        loss = module.criterion(module(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_schedules_warm_up_then_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = cosine(opt, total_steps=100, warmup=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 0.001 and max(lrs) == pytest.approx(0.1, rel=0.02)
    assert lrs.index(max(lrs)) in range(9, 12) and lrs[-1] < 0.001
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = one_cycle(opt, total_steps=100, warmup=0.3)
    peak = []
    for _ in range(100):
        peak.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(peak) == pytest.approx(0.2, rel=0.02) and peak.index(max(peak)) in range(28, 32)


def test_lightning_training_logs_per_epoch_metrics_and_learns():
    cfg = compose_cfg("data=digits", "train.epochs=2", "train/optimizer=adamw")
    dm = make_datamodule(cfg, load_training_data(cfg), resolution=16)
    result = train_arch(cfg, decode(TINY_ARCH), dm)
    assert result.epochs == 2
    assert result.val_acc > 0.5  # chance is 0.1
    metrics = result.module.trainer.callback_metrics
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert key in metrics


def test_train_cli_rejects_bad_arch_cleanly(capsys):
    from nas.train.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(compose_cfg("arch=nas1-r32-oops", "data=digits"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: cannot decode architecture 'nas1-r32-oops'" in err and "Traceback" not in err


def test_train_cli_trains_mobilenet_v1_on_digits(capsys):
    """The README's ``python -m nas.train arch=reference:mobilenet_v1 data=digits train.epochs=1``: the
    depthwise-separable network, adapted to 8-px digits (32 px, stride-1 stem), trains and learns."""
    from nas.train.__main__ import main

    # 700 of the images, three passes: BatchNorm's statistics settle (one pass over all of them: 0.18).
    val_acc = main(compose_cfg("arch=reference:mobilenet_v1", "data=digits", "train.epochs=1", "data.repeat=3",
                               "train.limit_train_images=700"))  # fmt: skip
    out = capsys.readouterr().out
    assert "training nas1-r32-w1-stem_c32_s1_r6-ds_k3_c64_s1_r6-ds_k3_c128_s1_r6-ds_k3_c128_s1_r6" in out
    assert "3.22 M params" in out  # 4,231,976 at 1000 classes, less 990 classifier rows of 1025
    assert f"val_acc={val_acc:.4f}" in out
    assert val_acc > 0.3  # chance is 0.1


def test_epoch_counts_stay_exact_when_the_module_is_cast_to_bf16():
    # train.precision=bf16-true casts every floating buffer; bf16 counts stop growing at 256.
    cfg = compose_cfg("data=digits", "train.epochs=2", "train/optimizer=adamw", "train.precision=bf16-true")
    dm = make_datamodule(cfg, load_training_data(cfg), resolution=16)
    result = train_arch(cfg, decode(TINY_ARCH), dm)
    images = len(dm.train_dataloader()) * dm.batch_size  # 4,600 per epoch: far past 256
    sums = result.module._epoch_sums
    assert sums.dtype == torch.float32
    assert float(sums[1]) == pytest.approx(float(result.module.trainer.callback_metrics["train_acc"]) * images)
    assert 0.3 < float(result.module.trainer.callback_metrics["train_acc"]) <= 1.0


class _NanOnRank1(ClassifierModule):
    """Rank 1 alone sees a non-finite loss at its first step (rank 0's stay finite); each rank that stops
    writes its message to ``folder``."""

    folder: Path

    def _accumulate(self, loss, logits, y):
        if self.global_rank == 1 and self._epoch_steps == 0:
            loss = loss * float("nan")
        super()._accumulate(loss, logits, y)

    def _raise_if_nonfinite(self):
        try:
            super()._raise_if_nonfinite()
        except NonFiniteLossError as exc:
            (self.folder / f"rank{self.global_rank}").write_text(str(exc))
            raise


def test_a_non_finite_loss_on_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path, monkeypatch):
    """Two gloo processes (forked: nothing to import again): the count of non-finite losses is summed over the
    ranks at the check, so both stop at the same step with the same message, rather than one raising while
    the other waits in the next gradient all-reduce until the collective times out."""
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.setenv(var, "")  # recorded, so what the launcher sets is undone after the test
        monkeypatch.delenv(var)
    cfg = compose_cfg("data=digits", "train.accelerator=cpu", "train.devices=2", "train.strategy=ddp_fork",
                      "train.epochs=1", "data.repeat=1", "train.batch_size=32",
                      "train.limit_train_images=256")  # fmt: skip
    dm = make_datamodule(cfg, load_training_data(cfg), 16)
    module = make_module(cfg, decode(TINY_ARCH), dm.num_classes)
    module.__class__, module.folder = _NanOnRank1, tmp_path
    with pytest.raises(Exception, match="training loss became NaN"):
        make_trainer(cfg).fit(module, datamodule=dm)
    said = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert said == {r: "training loss became NaN or infinite in epoch 0 (by step 4)" for r in ("rank0", "rank1")}


def test_nas_train_stops_a_diverged_run_with_one_line_and_the_fix(capsys):
    from nas.train.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(compose_cfg(f"arch={TINY_ARCH}", "data=digits", "train.epochs=1", "train.optimizer.lr=1e30"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training loss became NaN or infinite in epoch 0 (by step ")
    assert "Lower the learning rate (train.optimizer.lr=1e+30 now) and run again" in err and "Traceback" not in err
