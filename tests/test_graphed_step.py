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
from nas.train.graphed_step import graph_ready_optimizer
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
