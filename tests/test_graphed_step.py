"""The captured training step (``train.cuda_graph``) as far as a CPU can check it.

On a CPU the step runs eagerly on the same fixed buffers, with the same fused optimizer
reading its learning rate from a tensor, and under Lightning's manual optimization: the
whole path except the capture itself. It must train exactly like the automatic path.
"""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from nas.errors import NasError
from nas.search.faults import FaultInjection
from nas.space import decode
from nas.train.graphed_step import GraphedTrainStep, graph_ready_optimizer
from nas.train.module import ClassifierModule, NonFiniteLossError, param_groups
from nas.train.run import (
    check_train_cfg,
    load_training_data,
    make_datamodule,
    make_module,
    make_trainer,
    use_cuda_graph,
)
from tests.conftest import TINY_ARCH, compose_cfg


def _fit(cfg, dm, cuda_graph: bool, callbacks=()) -> tuple[ClassifierModule, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    t = cfg.train
    module = ClassifierModule(
        TINY_ARCH,
        dm.num_classes,
        optimizer=instantiate(t.optimizer),
        scheduler=instantiate(t.schedule),
        weight_decay=t.optimizer.weight_decay,
        dropout=0.0,
        cuda_graph=cuda_graph,
    )
    trainer = make_trainer(cfg, callbacks)
    trainer.fit(module, datamodule=dm)
    return module, trainer


@pytest.fixture(scope="module")
def digits():
    return load_training_data(compose_cfg("data=digits"))


def _recipe(*overrides: str):
    return compose_cfg("data=digits", "train.epochs=2", "train.optimizer.weight_decay=0.01", *overrides)


# Adam amplifies the last-bit difference of a float32 learning-rate tensor from step to step
# (1e-2 after 64 steps on this tiny net, 3e-5 after 16), so it is compared over fewer steps.
@pytest.mark.parametrize(("optimizer", "images"), [("sgd", 256), ("adamw", 64)])
def test_static_step_trains_like_lightning_automatic_optimization(digits, optimizer, images):
    cfg = _recipe(f"train/optimizer={optimizer}", f"train.limit_train_images={images}")
    dm = make_datamodule(cfg, digits, resolution=16)
    auto, auto_trainer = _fit(cfg, dm, cuda_graph=False)
    graph, graph_trainer = _fit(cfg, dm, cuda_graph=True)
    steps = 2 * len(dm.train_dataloader())
    assert steps == 2 * images * dm.repeat // dm.batch_size
    assert graph_trainer.global_step == auto_trainer.global_step == steps
    # Stepped once per batch in both: unstepped it would still be warming up, stepped twice past its end.
    lr_auto = auto_trainer.optimizers[0].param_groups[0]["lr"]
    lr_graph = graph_trainer.optimizers[0].param_groups[0]["lr"]
    assert isinstance(lr_graph, float) and lr_graph == pytest.approx(lr_auto, rel=1e-9)
    assert graph_trainer.optimizers[0].defaults["fused"] is True
    fresh = ClassifierModule(TINY_ARCH, dm.num_classes, optimizer=instantiate(cfg.train.optimizer)).model
    moved = 0.0
    for a, b, c in zip(
        auto.model.state_dict().values(), graph.model.state_dict().values(), fresh.state_dict().values(), strict=True
    ):
        a, b = a.cpu().float(), b.cpu().float()  # on a GPU machine this test trains (and captures) there
        assert torch.allclose(a, b, atol=2e-4, rtol=1e-3)
        moved = max(moved, (b - c.float()).abs().max().item())
    assert moved > 0.01  # and both really trained
    assert graph._graphed is None  # the step (and on a GPU its graph) is released when training ends
    assert graph.graph_captured is (dm.train_split.x.device.type == "cuda")  # run on a GPU, this test captures
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert float(graph_trainer.callback_metrics[key]) == pytest.approx(
            float(auto_trainer.callback_metrics[key]), abs=2e-3
        ), key


def test_static_step_detects_a_nonfinite_loss(digits):
    cfg = _recipe("train.limit_train_images=64")
    dm = make_datamodule(cfg, digits, resolution=16)
    with pytest.raises(NonFiniteLossError, match="epoch 0"):
        _fit(cfg, dm, cuda_graph=True, callbacks=[FaultInjection("nonfinite")])


def test_cuda_graph_refuses_cpu_mixed_precision_and_unfused_optimizers_with_the_fix():
    with pytest.raises(NasError, match=re.escape("needs a CUDA device; set train.cuda_graph=false")):
        make_module(compose_cfg("train.cuda_graph=true", "train.accelerator=cpu"), decode(TINY_ARCH), 10)
    bf16 = compose_cfg("train.cuda_graph=true", "train.precision=bf16-mixed")
    with pytest.raises(NasError, match=re.escape("supports train.precision=32-true only, not bf16-mixed")):
        check_train_cfg(bf16)
    rmsprop = compose_cfg("train.cuda_graph=true", "train.optimizer._target_=torch.optim.RMSprop")
    expected = "torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, not torch.optim.RMSprop"
    with pytest.raises(NasError, match=re.escape(expected)):
        check_train_cfg(rmsprop)
    assert use_cuda_graph(compose_cfg("train.precision=bf16-mixed").train) is False


def test_graph_ready_optimizer_keeps_settings_and_refuses_unfused_kinds():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sgd = torch.optim.SGD(param_groups(model, 0.01), lr=0.05, momentum=0.8, nesterov=True)
    fused = graph_ready_optimizer(sgd, param_groups(model, 0.01))
    assert type(fused) is torch.optim.SGD and fused.defaults["fused"] is True
    assert (fused.defaults["lr"], fused.defaults["momentum"], fused.defaults["nesterov"]) == (0.05, 0.8, True)
    assert [g["weight_decay"] for g in fused.param_groups] == [0.01, 0.0]
    adamw = graph_ready_optimizer(
        torch.optim.AdamW(model.parameters(), lr=0.003), [{"params": list(model.parameters())}]
    )
    assert adamw.defaults["fused"] is True and adamw.defaults["lr"] == 0.003
    assert adamw.defaults["capturable"] is False  # Adam's capturable path is for accelerators; on CPU it stays off
    with pytest.raises(NasError, match="supports the optimizers SGD, Adam, AdamW, not RMSprop"):
        graph_ready_optimizer(torch.optim.RMSprop(model.parameters()), [{"params": list(model.parameters())}])


def test_settings_a_captured_graph_cannot_follow_are_refused_before_training():
    """Review findings G3 (cumulative BatchNorm reads a host count inside capture) and G1 (one-cycle moves
    momentum every step, the captured fused kernel keeps its first value): refused up front, on any machine."""
    bn = compose_cfg("train.cuda_graph=true", "train.bn_momentum=null")
    with pytest.raises(NasError, match=re.escape("train.bn_momentum=null reads a step count on the host")):
        check_train_cfg(bn)
    cycling = compose_cfg("train.cuda_graph=true", "train/schedule=onecycle")
    with pytest.raises(NasError, match=re.escape("set train.schedule.cycle_momentum=false")):
        check_train_cfg(cycling)
    fixed = compose_cfg("train.cuda_graph=true", "train/schedule=onecycle", "train.schedule.cycle_momentum=false")
    with pytest.raises(NasError, match="needs a CUDA device"):  # past both checks: only the CPU stops it here
        check_train_cfg(fixed)
    assert compose_cfg("train/schedule=onecycle").train.schedule.cycle_momentum is True  # eager keeps torch's


def test_a_captured_step_under_ddp_is_refused_up_front_and_at_the_first_step(monkeypatch):
    """The graphed step calls plain backward() under manual optimization: DDP's all-reduce never runs and
    every process would train its own model. Refused on any machine before anything loads, and by the
    module itself however the processes were started."""
    for extra in ("train.devices=2", "train.num_nodes=2"):
        with pytest.raises(NasError, match=re.escape("cannot train with DDP (2 processes)")):
            check_train_cfg(compose_cfg("train.cuda_graph=true", extra))
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun with train.devices left at 1
    with pytest.raises(NasError, match=re.escape("Set train.cuda_graph=false for a multi-process run")):
        check_train_cfg(compose_cfg("train.cuda_graph=true"))
    monkeypatch.delenv("WORLD_SIZE")
    module = ClassifierModule(TINY_ARCH, 10, optimizer=instantiate(compose_cfg().train.optimizer), cuda_graph=True)
    module._trainer = type("Trainer", (), {"world_size": 2})()  # what Lightning's DDP gives the module
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with pytest.raises(NasError, match=re.escape("cannot train with DDP (2 processes)")):
        module._graphed_step(x, y)


def test_a_replay_stops_when_a_setting_the_graph_baked_in_has_changed():
    """G1's safety net: any optimizer setting besides the rate that moves after capture stops the run."""
    model = torch.nn.Linear(4, 2)
    opt = graph_ready_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), param_groups(model, 0.0))

    def body(x, y):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step = GraphedTrainStep(body, opt)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    step(x, y)  # eager on CPU
    replays = []
    step.graph = type("FakeGraph", (), {"replay": lambda self: replays.append(1)})()  # as if captured
    step.captured_settings = step._settings()
    step(x, y)
    assert replays == [1]
    for group in opt.param_groups:
        group["momentum"] = 0.85  # what OneCycleLR(cycle_momentum=True) does every step
    with pytest.raises(NasError, match=r"momentum changed from 0\.9 to 0\.85 after the training step was captured"):
        step(x, y)
    assert replays == [1]


def test_a_network_whose_capture_fails_trains_eagerly_with_the_reason_kept(monkeypatch, capsys):
    """Item 3 of the GPU issue: capture failing for one network (forced here) is no trial failure."""
    model = torch.nn.Linear(4, 2)
    opt = graph_ready_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), param_groups(model, 0.0))

    def body(x, y):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    attempts = []

    def failing_record(self):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(GraphedTrainStep, "_captures", lambda self: True)  # as on a GPU
    monkeypatch.setattr(GraphedTrainStep, "_record", failing_record)
    step = GraphedTrainStep(body, opt, warmup=0)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    before = model.weight.detach().clone()
    for _ in range(3):
        step(x, y)
    assert attempts == [1]  # tried once, then eager for the rest of the fit
    assert step.fallback == "operation not permitted when stream is capturing" and not step.captured
    assert not torch.equal(model.weight, before)  # every step trained, the failed one included
    assert "capture of the training step failed (operation not permitted" in capsys.readouterr().err

    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(GraphedTrainStep, "_record", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # out of memory stays what it is
        GraphedTrainStep(body, opt, warmup=0)(x, y)


def test_a_diverged_epoch_stops_within_fifty_steps_not_at_its_end(digits):
    """Review finding G5: a graphed epoch must not keep stepping on NaN weights until validation."""
    cfg = _recipe()  # 1,150 images x 4 passes / 32 = 143 steps per epoch
    dm = make_datamodule(cfg, digits, resolution=16)
    with pytest.raises(NonFiniteLossError, match=r"in epoch 0 \(by step 50\)"):
        _fit(cfg, dm, cuda_graph=True, callbacks=[FaultInjection("nonfinite")])
